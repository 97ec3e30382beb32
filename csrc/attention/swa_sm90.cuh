#pragma once
// Pieces of the sm_90a attention kernels (swa_fwd_sm90_kernel.cu, swa_bwd_sm90_kernel.cu): the aligned
// shared-memory base, the cp.async load of a tile into the 128-byte-swizzled layout of swa_wgmma.cuh, the
// descriptors of its K-major and MN-major operands, a tile's rows as register A fragments (load_a, RowsA), the
// products the kernels make of them (A B^T, A X, with A in shared memory or registers), a block of accumulators
// stored as a shared-memory A operand (store_a), the two-product pipeline step, and the launchers' dispatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention/swa_device.cuh"
#include "attention/swa_mma.cuh"
#include "attention/swa_wgmma.cuh"
#include "common/dtype.h"

namespace markovkit {
namespace swa_cuda {

constexpr int kAlign = 1024;  // period of the 128-byte swizzle: every tile starts at a multiple

// The first kAlign-aligned byte of the dynamic shared memory (the kernels ask kAlign bytes more).
__device__ __forceinline__ unsigned char* aligned_base(unsigned char* raw) {
  return raw + (kAlign - __cvta_generic_to_shared(raw) % kAlign) % kAlign;
}

// x, the same in every lane of the warp, broadcast from lane 0: the compiler then knows it is warp-uniform and
// builds what depends on it (the wgmma descriptors: a warpgroup's rows, a stage's tiles) in uniform registers.
// Without it each descriptor is built in vector registers and moved over by R2UR, its constant high word
// rematerialized for every wgmma (a pipelined dK/dV step, 5a102fc: 253 instructions to issue its 24 wgmma).
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

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

// A thread's share of the cp.async loads of kR-row tiles of head h of batch b of a (batch, seqlen, nheads, D)
// tensor into the swizzled layout. Thread x of kThreads copies the 16-byte chunks x + kThreads k of a tile's
// row-major rows: it keeps one chunk column c and steps kStep rows, a multiple of 8, so the swizzled position in
// its rows stays the same. Addresses and offsets are set up once; a load is then one predicated cp.async per row.
template <typename T, int D, int kR, int kThreads>
struct TileLoader {
  static constexpr int kPerRow = D / 8;  // 16-byte chunks per row
  static constexpr int kStep = kThreads / kPerRow;
  static_assert(kStep % 8 == 0 && kR % kStep == 0, "TileLoader: rows per step");
  const T* head;  // sequence position 0, column 8 c of the head
  int64_t pitch;  // elements from one position to the next
  int row, dst;   // the thread's first row of a tile; the byte offset of its chunk of that row in a tile

  __device__ TileLoader(const T* src, int64_t b, int64_t seqlen, int64_t nheads, int64_t h)
      : pitch(nheads * D), row(static_cast<int>(threadIdx.x) / kPerRow) {
    const int c = static_cast<int>(threadIdx.x) % kPerRow;
    head = src + (b * seqlen * nheads + h) * D + 8 * c;
    dst = c / 8 * (kR * 128) + row * 128 + 16 * ((c % 8) ^ (row % 8));
  }
  // Starts loading positions [r0, r0 + n), 1 <= n, of the head dh heads after the loader's into `tile`, zeros in
  // its rows from n on; complete after cp_async_wait_all, fence_proxy_async and a barrier. A zero row's copy names
  // the tile's row 0 (valid) and reads nothing. A full tile (n >= kR, the same for the whole CTA: most tiles) takes
  // a copy per row without the row test and address select (3 instructions a row, not 6).
  __device__ void load(int r0, int n, unsigned char* tile, int dh = 0) const {
    const T* first = head + r0 * pitch + dh * D;
    const T* at = first + row * pitch;
    if (n >= kR) {
#pragma unroll
      for (int k = 0; k < kR / kStep; ++k, at += kStep * pitch) cp_async_16(tile + dst + k * kStep * 128, at);
      return;
    }
#pragma unroll
    for (int k = 0; k < kR / kStep; ++k, at += kStep * pitch) {
      const bool in = row + k * kStep < n;
      cp_async_16_or_zero(tile + dst + k * kStep * 128, in ? at : first, in);
    }
  }
};

// A descriptor moved `bytes` (a multiple of 16) further into its tile: a 32-bit add to the start address field
// (bits 0-13, address / 16), which cannot carry out of it, shared memory being under 256 KB; the high word, the
// same for every descriptor of a kind, stays as it is.
__device__ __forceinline__ uint64_t desc_plus(uint64_t desc, int bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + static_cast<uint32_t>(bytes >> 4);
  return (desc & 0xffffffff00000000ull) | lo;
}

// The descriptor of a tile's K-major operands (k_major) and that of its MN-major ones (mn_major) at its first byte.
__device__ __forceinline__ uint64_t k_major_desc(const unsigned char* tile) { return smem_desc(tile, 16, 1024); }
template <int R>
__device__ __forceinline__ uint64_t mn_major_desc(const unsigned char* tile) {
  return smem_desc(tile, R * 128, 1024);
}

// Descriptor of the K-major operand rows [64 rb, 64 rb + 64) x k [16 kk, 16 kk + 16) of an R-row tile (rows are
// M or N, k the headdim) whose k_major_desc is `tile`.
template <int R>
__device__ __forceinline__ uint64_t k_major(uint64_t tile, int rb, int kk) {
  return desc_plus(tile, kk / 4 * (R * 128) + rb * 64 * 128 + kk % 4 * 32);
}

// Descriptor of the MN-major B operand k rows [16 kk, 16 kk + 16) x all headdim columns of an R-row tile (rows
// are k, the headdim N) whose mn_major_desc is `tile`.
__device__ __forceinline__ uint64_t mn_major(uint64_t tile, int kk) { return desc_plus(tile, kk * 16 * 128); }

// The warp's A fragments (rows [row0, row0 + 16), D / 16 of them along the headdim) of an R-row tile, by
// ldmatrix: lane l gives row row0 + l % 8 + 8 (l / 8 % 2) of the 16-byte chunk 2 kk + l / 16.
template <int D, int R>
__device__ __forceinline__ void load_a(const unsigned char* tile, int row0, uint32_t (&a)[D / 16][4]) {
  const int lane = static_cast<int>(threadIdx.x % 32), r = row0 + lane % 8 + 8 * (lane / 8 % 2);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int chunk = 2 * kk + lane / 16;
    const unsigned char* at = tile + chunk / 8 * (R * 128) + r * 128 + 16 * ((chunk % 8) ^ (r % 8));
    ldmatrix_x4<false>(reinterpret_cast<const uint16_t*>(at), a[kk]);
  }
}

// The A fragments (16 keys or queries each) of a 16 x 8 kF block held as C fragments.
template <typename T, int kF>
__device__ __forceinline__ void to_a(const float (&c)[kF][4], uint32_t (&a)[kF / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < kF / 2; ++kk) c_to_a<T>(c[2 * kk], c[2 * kk + 1], a[kk]);
}

// acc (64 x 64) = A B^T over the headdim: A rows [64 rb, 64 rb + 64) of a kRowsA-row tile, B the 64 rows of
// another, both read K-major.
template <typename T, int D, int kRowsA>
__device__ __forceinline__ void ss_abt(float (&acc)[kBN / 8][4], const unsigned char* a, int rb,
                                       const unsigned char* b) {
  const uint64_t da = k_major_desc(a), db = k_major_desc(b);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    wgmma_ss<T, kBN, false>(acc, k_major<kRowsA>(da, rb, kk), k_major<kBN>(db, 0, kk), kk > 0);
  }
}

// acc (64 x N, N = 8 kF: 64 or 128) = A B^T over the headdim: A (64 x D) in registers (load_a), B the N rows of a
// tile read K-major.
template <typename T, int D, int kF>
__device__ __forceinline__ void rs_abt(float (&acc)[kF][4], const uint32_t (&a)[D / 16][4], const unsigned char* b) {
  const uint64_t db = k_major_desc(b);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wgmma_rs<T, 8 * kF, false>(acc, a[kk], k_major<8 * kF>(db, 0, kk), kk > 0);
}

// The warpgroup's 64 rows of a fixed 128-row tile (a CTA's queries) as the A operand of products acc = A B^T over
// the headdim: as register fragments (kInRegs: loaded once, after the tile is in; the products then read only B
// from shared memory) or read from the tile by each product.
template <typename T, int D, bool kInRegs>
struct RowsA {
  const unsigned char* tile;
  int wg;
  uint32_t a[kInRegs ? D / 16 : 1][4];
  __device__ RowsA(const unsigned char* tile, int wg) : tile(tile), wg(wg) {
    if constexpr (kInRegs) load_a<D, 128>(tile, static_cast<int>(threadIdx.x / 32) * 16, a);
  }
  // acc (64 x 8 kF) over the 8 kF rows of the tile b: kF = 8 (64 rows), or 16 with kInRegs.
  template <int kF>
  __device__ void abt(float (&acc)[kF][4], const unsigned char* b) const {
    if constexpr (kInRegs) {
      rs_abt<T, D>(acc, a, b);
    } else {
      ss_abt<T, D, 128>(acc, tile, wg, b);
    }
  }
};

// acc (64 x D) += A X, A (64 x 16 kK) in registers, X the 16 kK rows of a tile read MN-major.
template <typename T, int D, int kK>
__device__ __forceinline__ void rs_ax(float (&acc)[D / 8][4], const uint32_t (&a)[kK][4], const unsigned char* x) {
  const uint64_t dx = mn_major_desc<16 * kK>(x);
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) wgmma_rs<T, D, true>(acc, a[kk], mn_major(dx, kk), true);
}

// acc (64 x D) += A X, A (64 x 64) the one-panel K-major tile `a` (store_a), X the 64 rows of a tile read MN-major.
template <typename T, int D>
__device__ __forceinline__ void ss_ax(float (&acc)[D / 8][4], const unsigned char* a, const unsigned char* x) {
  const uint64_t da = k_major_desc(a), dx = mn_major_desc<64>(x);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_ss<T, D, true>(acc, k_major<64>(da, 0, kk), mn_major(dx, kk), true);
}

// Stores the warp's rows [row0, row0 + 16) (row0 a multiple of 16) of a 64 x 64 block held as C fragments, rounded
// to T, into the 64-row one-panel tile `a` as ss_ax reads it (for the tensor cores after fence_proxy_async).
// Element (n, e) is (row0 + g + 8 (e / 2), 8 n + 2 t + e % 2): one 4-byte store per pair, the 8 rows g of a store
// in the 8 different 16-byte chunks n ^ g, so the warp's 32 stores hit 32 banks.
template <typename T>
__device__ __forceinline__ void store_a(const float (&c)[8][4], unsigned char* a, int row0, Lane ln) {
#pragma unroll
  for (int n = 0; n < 8; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      unsigned char* at = a + (row0 + ln.g + 8 * half) * 128 + 16 * (n ^ ln.g) + 4 * ln.t;
      *reinterpret_cast<uint32_t*>(at) = pack<T>(c[n][2 * half], c[n][2 * half + 1]);
    }
  }
}

// One step of the kernels' two-product pipelines (the forward's S(t) beside O += P(t - 1) V(t - 1), dQ's S(t), dP(t)
// beside dQ += dS(t - 1) K(t - 1)) for a warpgroup that sees tile t (`sees`) and holds an operand from the last tile
// it saw (`pending`): issue_new commits tile t's products, issue_held the held ones; make turns tile t's
// accumulators into the values of the next held operand while the held products run, hold stores them as that
// operand (registers or shared memory) once the held products are done with it; fence_held fences the held
// products' accumulators. Three straight-line cases: with a wait or an operand access in a branch whose path ptxas
// cannot relate to the wgmma's issue, it serializes every wgmma of the kernel.
template <typename IssueNew, typename IssueHeld, typename Make, typename Hold, typename FenceHeld>
__device__ __forceinline__ void pipeline_step(bool sees, bool pending, IssueNew issue_new, IssueHeld issue_held,
                                              Make make, Hold hold, FenceHeld fence_held) {
  if (sees && pending) {
    issue_new();
    issue_held();
    wgmma_wait<1>();
    make();
    wgmma_wait<0>();
    fence_held();
    hold();
  } else if (sees) {
    issue_new();
    wgmma_wait<0>();
    make();
    hold();
  } else if (pending) {
    issue_held();
    wgmma_wait<0>();
    fence_held();
  }
}

// Calls fn.template operator()<T, D>() for the dtype (float16 / bfloat16) and headdim (64 / 128) of a launch.
template <typename Fn>
void dispatch_sm90(DType dtype, int64_t headdim, Fn fn) {
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (headdim == 64) {
      fn.template operator()<T, 64>();
    } else {
      fn.template operator()<T, 128>();
    }
  });
}

}  // namespace swa_cuda
}  // namespace markovkit
