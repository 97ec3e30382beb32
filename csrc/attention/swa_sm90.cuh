#pragma once
// Pieces of the sm_90a attention kernels (swa_fwd_sm90.cu, swa_bwd_sm90.cu): the aligned shared-memory base, the
// cp.async load of a tile into the 128-byte-swizzled layout of swa_wgmma.cuh, and the descriptors of its K-major
// and MN-major operands.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention/swa_mma.cuh"
#include "common/dtype.h"
#include "attention/swa_wgmma.cuh"

namespace markovkit {
namespace swa_cuda {

constexpr int kAlign = 1024;  // period of the 128-byte swizzle: every tile starts at a multiple

// The first kAlign-aligned byte of the dynamic shared memory (the kernels ask kAlign bytes more).
__device__ __forceinline__ unsigned char* aligned_base(unsigned char* raw) {
  return raw + (kAlign - __cvta_generic_to_shared(raw) % kAlign) % kAlign;
}

template <int D>
__device__ __forceinline__ void zero(float (&acc)[D / 8][4]) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  }
}

// Bytes of an R-row tile of headdim D: D / 64 panels of R rows x 128 bytes.
template <typename T, int D, int R>
constexpr int tile_bytes() {
  return R * D * static_cast<int>(sizeof(T));
}

// Starts loading rows [r0, r0 + n) of head h of a (batch, seqlen, nheads, D) tensor into the kR-row swizzled tile,
// zeros beyond n; complete after cp_async_wait_all, fence_proxy_async and a barrier. Thread x of kThreads copies
// the 16-byte chunks x + kThreads k of the row-major rows: it keeps one chunk column and steps kStep rows, a
// multiple of 8, so the swizzled position in its row stays the same.
template <typename T, int D, int kR, int kThreads>
__device__ void load_tile(const T* __restrict__ src, int64_t b, int64_t r0, int64_t n, int64_t seqlen,
                          int64_t nheads, int64_t h, unsigned char* tile) {
  constexpr int kPerRow = D / 8;  // 16-byte chunks per row
  constexpr int kStep = kThreads / kPerRow;
  static_assert(kStep % 8 == 0 && kR % kStep == 0, "load_tile: rows per step");
  const int c = static_cast<int>(threadIdx.x) % kPerRow, r = static_cast<int>(threadIdx.x) / kPerRow;
  const int nr = static_cast<int>(n < kR ? n : kR);
  const T* from = src + ((b * seqlen + r0 + r) * nheads + h) * D + 8 * c;
  unsigned char* dst = tile + c / 8 * (kR * 128) + r * 128 + 16 * ((c % 8) ^ (r % 8));
  const int64_t step = kStep * nheads * D;
#pragma unroll 1
  for (int row = r; row < kR; row += kStep, from += step, dst += kStep * 128) {
    if (row < nr) {
      cp_async_16(dst, from);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Descriptor of the K-major operand rows [64 rb, 64 rb + 64) x k [16 kk, 16 kk + 16) of an R-row tile (rows are
// M or N, k the headdim).
template <int R>
__device__ __forceinline__ uint64_t k_major(const unsigned char* tile, int rb, int kk) {
  return smem_desc(tile + kk / 4 * (R * 128) + rb * 64 * 128 + kk % 4 * 32, 16, 1024);
}

// Descriptor of the MN-major B operand k rows [16 kk, 16 kk + 16) x all headdim columns of an R-row tile (rows
// are k, the headdim N).
template <int R>
__device__ __forceinline__ uint64_t mn_major(const unsigned char* tile, int kk) {
  return smem_desc(tile + kk * 16 * 128, R * 128, 1024);
}

// Calls fn.template operator()<T, D>() for the dtype (float16 / bfloat16) and headdim (64 / 128) of a launch.
template <typename Fn>
void dispatch_sm90(DType dtype, int64_t headdim, Fn fn) {
  auto with_type = [&](auto tag) {
    using T = decltype(tag);
    if (headdim == 64) {
      fn.template operator()<T, 64>();
    } else {
      fn.template operator()<T, 128>();
    }
  };
  if (dtype == DType::kBFloat16) {
    with_type(__nv_bfloat16{});
  } else {
    with_type(__half{});
  }
}

}  // namespace swa_cuda
}  // namespace markovkit
