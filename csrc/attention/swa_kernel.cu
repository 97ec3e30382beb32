// CUDA sliding-window attention for float16 / bfloat16 with float32 accumulation, FlashAttention-2 style
// on tensor cores: mma.sync.m16n8k16 through inline PTX, scores and probabilities kept in registers.
//
// Every CTA has 4 warps. The backward kernels hold tiles of 64 rows, warp w owning rows [16 w, 16 w + 16); the
// forward's query tile has 64 kMB rows, warp w owning the kMB blocks of 16 rows from 16 kMB w (fwd_row_blocks).
// The fragment layouts are those of the PTX ISA for m16n8k16 (lane = 4 g + t, g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major) four 32-bit registers: (g, 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..)
//   B (16 x 8, k x n)       two registers:         (k = 2t..2t+1, n = g), (k = 2t + 8.., n = g)
//   C (16 x 8, float)       four floats:           (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)
// so the C fragments of two adjacent 8-column score tiles are, packed to 16 bits, the A fragment of the
// next product (P V and the backward's P^T dO, dS^T Q, dS K) without a trip through shared memory.
//
// Forward: CTA per (query tile of 64 kMB rows, batch * head); key tiles of kBN keys over [0, sink_end) and
// [window_begin, i1) (swa_params.h); a warp skips the key tiles none of its rows sees and evaluates the mask
// only on tiles that its rows do not fully see; online softmax in base 2 with scale * log2(e) folded in; K
// and V tiles arrive by cp.async behind the products (V during Q K^T, the next K during P V).
// Backward (deterministic, no atomics): one kernel per key tile computes dK, dV (over the query tiles of
// every head of the group that see the tile; the warp owns key rows and computes S^T = K Q^T directly;
// headdim 256 splits the dK, dV columns over two CTAs), one per query tile computes dQ (over its key
// tiles), both loading the next tiles by cp.async behind the products; both recompute P = exp(S - lse) and
// use dS = P (dP - delta), delta = rowsum(dO O) - dlse from a first small kernel (swa_bwd_delta_kernel).
// On an sm_90 device of an sm_90a build, headdims 64 and 128 take the wgmma forward of swa_fwd_sm90_kernel.cu
// and the wgmma dK, dV and dQ kernels of swa_bwd_sm90_kernel.cu instead (after the same delta kernel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "attention/swa_device.cuh"
#include "attention/swa_mma.cuh"
#include "attention/swa_params.h"

namespace markovkit {
namespace {
using namespace swa_cuda;

constexpr int kThreads = 128;
constexpr int kPad = 8;  // row padding of shared-memory tiles (elements): conflict-free fragment loads

// A fragment of rows [r0, r0 + 16) x cols [k0, k0 + 16) of a row-major tile with leading dimension ld:
// matrices (rows + 0, cols + 0), (+ 8, + 0), (+ 0, + 8), (+ 8, + 8).
__device__ __forceinline__ void load_a(const void* tile, int ld, int r0, int k0, Lane ln, uint32_t (&a)[4]) {
  const int lane = 4 * ln.g + ln.t, mi = lane / 8;
  const int row = r0 + lane % 8 + 8 * (mi % 2), col = k0 + 8 * (mi / 2);
  ldmatrix_x4<false>(static_cast<const uint16_t*>(tile) + static_cast<int64_t>(row) * ld + col, a);
}

// B fragments (k in [k0, k0 + 16)) of the n-tiles [n0, n0 + 8) and [n0 + 8, n0 + 16) with B(k, n) = X[n][k]
// (X rows are the n index): b = {b0, b1 of the first, b0, b1 of the second}.
__device__ __forceinline__ void load_b_rows(const void* tile, int ld, int n0, int k0, Lane ln, uint32_t (&b)[4]) {
  const int lane = 4 * ln.g + ln.t, mi = lane / 8;
  const int row = n0 + lane % 8 + 8 * (mi / 2), col = k0 + 8 * (mi % 2);
  ldmatrix_x4<false>(static_cast<const uint16_t*>(tile) + static_cast<int64_t>(row) * ld + col, b);
}

// The same with B(k, n) = X[k][n] (X rows are the k index), through the transposing load.
__device__ __forceinline__ void load_b_cols(const void* tile, int ld, int k0, int n0, Lane ln, uint32_t (&b)[4]) {
  const int lane = 4 * ln.g + ln.t, mi = lane / 8;
  const int row = k0 + lane % 8 + 8 * (mi % 2), col = n0 + 8 * (mi / 2);
  ldmatrix_x4<true>(static_cast<const uint16_t*>(tile) + static_cast<int64_t>(row) * ld + col, b);
}

// acc (16 rows x kBN cols, as kBN / 8 C fragments) = rows [r0, r0 + 16) of A times X^T over D, where the
// B operand comes from the kBN rows of X (B(k, n) = X[n][k]).
template <typename T, int D>
__device__ __forceinline__ void warp_abt(const T* a_tile, const T* x_tile, int r0, Lane ln, float (&acc)[kBN / 8][4]) {
  constexpr int kLd = D + kPad;
#pragma unroll
  for (int n = 0; n < kBN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a(a_tile, kLd, r0, 16 * kk, ln, a);
#pragma unroll
    for (int n = 0; n < kBN / 8; n += 2) {
      uint32_t b[4];
      load_b_rows(x_tile, kLd, 8 * n, 16 * kk, ln, b);
      mma<T>(acc[n], a, b[0], b[1]);
      mma<T>(acc[n + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 rows x kCols, as kCols / 8 C fragments) += P (16 x 64, as C fragments) times columns
// [c0, c0 + kCols) of the 64 rows of X (64 x D).
template <typename T, int D, int kCols = D>
__device__ __forceinline__ void warp_px(const float (&p)[kBN / 8][4], const T* x_tile, int c0, Lane ln,
                                        float (&acc)[kCols / 8][4]) {
  constexpr int kLd = D + kPad;
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    uint32_t a[4];
    c_to_a<T>(p[2 * kk], p[2 * kk + 1], a);
#pragma unroll
    for (int n = 0; n < kCols / 8; n += 2) {
      uint32_t b[4];
      load_b_cols(x_tile, kLd, 16 * kk, c0 + 8 * n, ln, b);
      mma<T>(acc[n], a, b[0], b[1]);
      mma<T>(acc[n + 1], a, b[2], b[3]);
    }
  }
}

// Starts loading tile (kRows, D + kPad) = rows [r0, r0 + n) of head h of a (batch, seqlen, nheads, D) tensor,
// zero beyond n; the tile is complete after cp_async_wait_all and __syncthreads. Thread x copies the 16-byte
// chunks x + k·kThreads of the row-major tile. Where kThreads is a multiple of the chunks per row (every headdim
// but 96) a thread's chunks share its column, kStep rows apart: the loop steps two pointers and a row (the address
// arithmetic once per call, not per chunk; not unrolled, which would hold more registers than the kernels have).
template <typename T, int D, int kRows = 64>
__device__ void load_rows(const T* __restrict__ src, int64_t b, int64_t r0, int64_t n, int64_t seqlen,
                          int64_t nheads, int64_t h, T* tile) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = D / kVec;
  const T* rows = src + ((b * seqlen + r0) * nheads + h) * D;  // row r0 of head h
  const int64_t row_stride = nheads * D;
  const int nr = static_cast<int>(n < kRows ? n : kRows);
  auto chunk = [&](int r, T* dst, const T* from) {
    if (r < nr) {
      cp_async_16(dst, from);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  };
  if constexpr (kThreads % kPerRow == 0) {
    constexpr int kStep = kThreads / kPerRow;
    const int c = static_cast<int>(threadIdx.x) % kPerRow * kVec;
    int r = static_cast<int>(threadIdx.x) / kPerRow;
    T* dst = tile + r * (D + kPad) + c;
    const T* from = rows + r * row_stride + c;
    const int64_t step = kStep * row_stride;
#pragma unroll 1
    for (; r < kRows; r += kStep, dst += kStep * (D + kPad), from += step) chunk(r, dst, from);
  } else {
#pragma unroll 1
    for (int x = static_cast<int>(threadIdx.x); x < kRows * kPerRow; x += kThreads) {
      const int r = x / kPerRow, c = x % kPerRow * kVec;
      chunk(r, tile + r * (D + kPad) + c, rows + r * row_stride + c);
    }
  }
}

template <typename T, int D, int kRows = 64>
constexpr int64_t tile_bytes() {
  return int64_t{kRows} * (D + kPad) * sizeof(T);
}

// Blocks of 16 query rows per warp in the forward. With two, every K and V fragment read from shared memory
// feeds two mma (half the shared-memory traffic per product); at headdim 256 the two float32 output
// accumulators (256 registers per lane) do not fit, and at 96 ptxas spills, so these keep one.
template <int D>
constexpr int fwd_row_blocks() {
  return D == 96 || D > 128 ? 1 : 2;
}

// Whether the forward keeps the warp's Q fragments in registers across key tiles (they fit beside the
// accumulators without spills up to this headdim) instead of reading them from shared memory for every tile.
template <int D>
constexpr bool fwd_q_in_regs() {
  return D <= 32;
}

template <typename T, int D>
constexpr int64_t fwd_smem_bytes() {
  return tile_bytes<T, D, 64 * fwd_row_blocks<D>()>() + 2 * tile_bytes<T, D>();
}

// The A fragments (row blocks [rb + 16 mb, + 16) x cols [16 kk, + 16)) of the warp's kMB blocks of a row-major
// (rows, D + kPad) tile in shared memory, read at each use.
template <typename T, int D, int kMB, bool kInRegs>
struct RowFrags {
  const T* tile;
  int rb;
  Lane ln;
  __device__ RowFrags(const T* tile, int rb, Lane ln) : tile(tile), rb(rb), ln(ln) {}
  __device__ __forceinline__ void get(int mb, int kk, uint32_t (&a)[4]) const {
    load_a(tile, D + kPad, rb + 16 * mb, 16 * kk, ln, a);
  }
};

// The same, copied into registers once (the tile must be complete).
template <typename T, int D, int kMB>
struct RowFrags<T, D, kMB, true> {
  uint32_t frag[kMB][D / 16][4];
  __device__ RowFrags(const T* tile, int rb, Lane ln) {
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a(tile, D + kPad, rb + 16 * mb, 16 * kk, ln, frag[mb][kk]);
    }
  }
  __device__ __forceinline__ void get(int mb, int kk, uint32_t (&a)[4]) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) a[e] = frag[mb][kk][e];
  }
};

// acc[mb] (16 rows x kBN cols, as C fragments) = row block mb of A times X^T over D, where the B operand comes
// from the kBN rows of X (B(k, n) = X[n][k]); every B fragment loaded serves the kMB row blocks.
template <typename T, int D, int kMB, bool kInRegs>
__device__ __forceinline__ void warp_abt_blocks(const RowFrags<T, D, kMB, kInRegs>& a_frags, const T* x_tile, Lane ln,
                                                float (&acc)[kMB][kBN / 8][4]) {
  constexpr int kLd = D + kPad;
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mb][n][e] = 0.0f;
    }
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[kMB][4];
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) a_frags.get(mb, kk, a[mb]);
#pragma unroll
    for (int n = 0; n < kBN / 8; n += 2) {
      uint32_t b[4];
      load_b_rows(x_tile, kLd, 8 * n, 16 * kk, ln, b);
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        mma<T>(acc[mb][n], a[mb], b[0], b[1]);
        mma<T>(acc[mb][n + 1], a[mb], b[2], b[3]);
      }
    }
  }
}

// acc[mb] (16 rows x D, as C fragments) += P[mb] (16 x kBN, as C fragments) times the kBN rows of X (kBN x D);
// every B fragment loaded serves the kMB row blocks.
template <typename T, int D, int kMB>
__device__ __forceinline__ void warp_px_blocks(const float (&p)[kMB][kBN / 8][4], const T* x_tile, Lane ln,
                                               float (&acc)[kMB][D / 8][4]) {
  constexpr int kLd = D + kPad;
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    uint32_t a[kMB][4];
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) c_to_a<T>(p[mb][2 * kk], p[mb][2 * kk + 1], a[mb]);
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];
      load_b_cols(x_tile, kLd, 16 * kk, 8 * n, ln, b);
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        mma<T>(acc[mb][n], a[mb], b[0], b[1]);
        mma<T>(acc[mb][n + 1], a[mb], b[2], b[3]);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_fwd_kernel(const SwaFwdParams p) {
  constexpr int kMB = fwd_row_blocks<D>(), kRows = 64 * kMB;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sk = reinterpret_cast<T*>(smem + tile_bytes<T, D, kRows>());
  T* sv = reinterpret_cast<T*>(smem + tile_bytes<T, D, kRows>() + tile_bytes<T, D>());

  const SwaShape& s = p.s;
  const Window w(s);
  const int64_t L = s.seqlen;
  const auto [i0, bh, b, h, hk, ni] = QueryBlock(s, kRows);
  const int warp = threadIdx.x / 32, rb = 16 * kMB * warp;  // the warp's rows: [rb, rb + 16 kMB) of the tile
  const auto [wi0, wi1] = row_span(i0, rb, 16 * kMB, ni);  // the warp's rows as queries
  const Lane ln = Lane::of_thread();
  const float scale_log2 = static_cast<float>(s.scale) * kLog2e;

  // K and V move in by cp.async while the warps compute (FlashAttention-2's order): V(j) during S = Q K(j)^T
  // and the softmax, K(j + 1) during O += P V(j).
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  KeyTiles tiles(i0, i0 + ni, w);
  load_rows<T, D, kRows>(static_cast<const T*>(p.q), b, i0, ni, L, s.heads, h, sq);
  load_rows<T, D>(k, b, tiles.j0, tiles.size(), L, s.kv_heads, hk, sk);
  float o[kMB][D / 8][4];
  float m[kMB][2], l[kMB][2];  // running row max (log2 units) of rows g, g + 8; this lane's part of the row sums
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mb][n][e] = 0.0f;
    }
    m[mb][0] = m[mb][1] = -INFINITY;
    l[mb][0] = l[mb][1] = 0.0f;
  }
  cp_async_wait_all();
  __syncthreads();  // Q and K(first) are in
  const RowFrags<T, D, kMB, fwd_q_in_regs<D>()> qf(sq, rb, ln);

  while (!tiles.done()) {
    const int j0 = tiles.j0, nj = tiles.size();
    load_rows<T, D>(v, b, j0, nj, L, s.kv_heads, hk, sv);
    // warp-uniform: a tile none of the warp's rows sees costs the warp only the loads and barriers
    const bool live = wi0 < wi1 && !swa_tile_empty(wi0, wi1, j0, j0 + nj, w.window, w.sink);
    float sc[kMB][kBN / 8][4];
    if (live) {
      warp_abt_blocks(qf, sk, ln, sc);
      if (nj < kBN || !swa_tile_full(wi0, wi1, j0, j0 + nj, w.window, w.sink)) {
        const TileMask mask(i0, j0, nj, w);
#pragma unroll
        for (int mb = 0; mb < kMB; ++mb) mask.apply(sc[mb], rb + 16 * mb, ln);
      }
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) softmax_step<D>(sc[mb], m[mb], l[mb], o[mb], scale_log2);
    }
    cp_async_wait_all();
    __syncthreads();  // V(j0) is in; every warp is done with sk
    tiles.next();
    if (!tiles.done()) load_rows<T, D>(k, b, tiles.j0, tiles.size(), L, s.kv_heads, hk, sk);
    if (live) warp_px_blocks<T, D, kMB>(sc, sv, ln, o);
    cp_async_wait_all();
    __syncthreads();  // K(j0 + 1) is in; every warp is done with sv
  }
  float* lse = static_cast<float*>(p.lse) + bh * L;
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      l[mb][half] = quad_sum(l[mb][half]);
      inv[half] = l[mb][half] > 0.0f ? 1.0f / l[mb][half] : 0.0f;
    }
    store_rows<T, D>(o[mb], inv, static_cast<T*>(p.out), b, i0, 0, rb + 16 * mb, ni, L, s.heads, h, ln);
    if (ln.t == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = rb + 16 * mb + ln.g + 8 * half;
        if (r < ni) lse[i0 + r] = (m[mb][half] + log2f(l[mb][half])) / kLog2e;
      }
    }
  }
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// delta = rowsum(dout * out) - dlse of kRowsPerBlock rows (b, i, h) of q's layout, 4 lanes per row (each
// lane reads every fourth 16-byte vector of the row; a warp reads 8 rows).
constexpr int kRowsPerBlock = kThreads / 4;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_bwd_delta_kernel(const SwaBwdParams p) {
  constexpr int kVec = 16 / sizeof(T);
  const SwaShape& s = p.s;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 4;
  const bool live = row < s.batch * s.seqlen * s.heads;
  float acc = 0.0f;
  if (live) {
    const T* out = static_cast<const T*>(p.out) + row * D;
    const T* dout = static_cast<const T*>(p.dout) + row * D;
#pragma unroll
    for (int c = kVec * (threadIdx.x % 4); c < D; c += 4 * kVec) {
      const uint4 ov = *reinterpret_cast<const uint4*>(out + c), dv = *reinterpret_cast<const uint4*>(dout + c);
      T o[kVec], d[kVec];  // copied, not cast: reading a uint4 through a T* breaks strict aliasing
      memcpy(o, &ov, sizeof(ov));
      memcpy(d, &dv, sizeof(dv));
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc += to_float(o[e]) * to_float(d[e]);
    }
  }
  acc = quad_sum(acc);
  if (live && threadIdx.x % 4 == 0) {
    const int64_t at = swa_stat_index(row, s.seqlen, s.heads);
    const float* dlse = static_cast<const float*>(p.dlse);
    static_cast<float*>(p.delta)[at] = dlse == nullptr ? acc : acc - dlse[at];
  }
}

template <typename T, int D>
constexpr int64_t bwd_smem_bytes() {
  return 4 * tile_bytes<T, D>() + 2 * 64 * sizeof(float);
}

// Columns of dK, dV per CTA of the dK, dV kernel: above headdim 128 the two float32 accumulators (D values
// per lane) do not fit in the 255 registers (they spill), so two CTAs share a key tile, each recomputing S
// and dP and accumulating half the columns.
template <int D>
constexpr int dkdv_cols() {
  return D > 128 ? D / 2 : D;
}

// dK, dV columns [c0, c0 + kCols), c0 = kCols blockIdx.z, of key tile blockIdx.x for (batch, kv head)
// blockIdx.y; warp w owns keys [16 w, 16 w + 16).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_bwd_dkdv_kernel(const SwaBwdParams p) {
  constexpr int kCols = dkdv_cols<D>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem);
  T* sv = reinterpret_cast<T*>(smem + tile_bytes<T, D>());
  T* sq = reinterpret_cast<T*>(smem + 2 * tile_bytes<T, D>());
  T* sdo = reinterpret_cast<T*>(smem + 3 * tile_bytes<T, D>());
  float* slse = reinterpret_cast<float*>(smem + 4 * tile_bytes<T, D>());
  float* sdelta = slse + 64;

  const SwaShape& s = p.s;
  const Window w(s);
  const int64_t L = s.seqlen;
  const int group = static_cast<int>(s.heads / s.kv_heads);
  const auto [j0, b, hk, nj, q_end] = KeyBlock(s, kBN);
  const int c0 = static_cast<int>(blockIdx.z) * kCols;
  const int warp = threadIdx.x / 32;
  const Lane ln = Lane::of_thread();
  const float scale = static_cast<float>(s.scale);

  // Q and dO move in by cp.async while the warps compute: dO(t) during S^T = K Q(t)^T, Q(t + 1) and the
  // statistics during dV += P^T dO(t).
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  // a tile's statistics go to registers, then to shared memory at the next loop top: warps 0 and 1 do not wait
  // for their global loads before dV += P^T dO
  RowStats<kBM> stats;
  const auto load_stats_of = [&](const QueryTiles& t) {
    const int64_t at = (b * s.heads + t.h) * L;
    stats.load(static_cast<const float*>(p.lse) + at, static_cast<const float*>(p.delta) + at, t.i0, t.size());
  };
  QueryTiles tiles(hk * group, (hk + 1) * group, j0, q_end);
  load_rows<T, D>(static_cast<const T*>(p.k), b, j0, nj, L, s.kv_heads, hk, sk);
  load_rows<T, D>(static_cast<const T*>(p.v), b, j0, nj, L, s.kv_heads, hk, sv);
  load_rows<T, D>(q, b, tiles.i0, tiles.size(), L, s.heads, tiles.h, sq);
  load_stats_of(tiles);
  float dk[kCols / 8][4], dv[kCols / 8][4];
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.0f;
  }
  while (!tiles.done()) {
    const int h = tiles.h, i0 = tiles.i0, ni = tiles.size();
    stats.store(slse, sdelta, scale);  // no warp reads them between the last barrier and the next
    cp_async_wait_all();
    __syncthreads();  // Q(i0), the statistics (and K, V) are in; every warp is done with the previous sdo
    load_rows<T, D>(dout, b, i0, ni, L, s.heads, h, sdo);
    float st[kBN / 8][4], dpt[kBN / 8][4];  // S^T, dP^T: rows are keys, cols are queries
    warp_abt<T, D>(sk, sq, 16 * warp, ln, st);
    if (!swa_tile_full(i0, i0 + ni, j0, j0 + nj, w.window, w.sink)) {  // partial tiles need no bounds (KeyRowMask)
      KeyRowMask(i0, j0, w).apply(st, 16 * warp, ln);
    }
    cp_async_wait_all();
    __syncthreads();  // dO(i0) is in
    warp_abt<T, D>(sv, sdo, 16 * warp, ln, dpt);
    p_and_ds(st, dpt, warp, ln, scale, [&](int, int c) { return slse[c]; }, [&](int, int c) { return sdelta[c]; });
    warp_px<T, D, kCols>(dpt, sq, c0, ln, dk);  // dK += scale dS^T Q
    __syncthreads();                 // every warp is done with sq, slse, sdelta
    tiles.next();
    if (!tiles.done()) {
      load_rows<T, D>(q, b, tiles.i0, tiles.size(), L, s.heads, tiles.h, sq);
      load_stats_of(tiles);
    }
    warp_px<T, D, kCols>(st, sdo, c0, ln, dv);  // dV += P^T dO
  }
  const float one[2] = {1.0f, 1.0f};
  store_rows<T, D, kCols>(dk, one, static_cast<T*>(p.dk), b, j0, c0, 16 * warp, nj, L, s.kv_heads, hk, ln);
  store_rows<T, D, kCols>(dv, one, static_cast<T*>(p.dv), b, j0, c0, 16 * warp, nj, L, s.kv_heads, hk, ln);
}

// dQ of query tile blockIdx.x for (batch, head) blockIdx.y; warp w owns queries [16 w, 16 w + 16).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_bwd_dq_kernel(const SwaBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sdo = reinterpret_cast<T*>(smem + tile_bytes<T, D>());
  T* sk = reinterpret_cast<T*>(smem + 2 * tile_bytes<T, D>());
  T* sv = reinterpret_cast<T*>(smem + 3 * tile_bytes<T, D>());
  float* slse = reinterpret_cast<float*>(smem + 4 * tile_bytes<T, D>());
  float* sdelta = slse + 64;

  const SwaShape& s = p.s;
  const Window w(s);
  const int64_t L = s.seqlen;
  const auto [i0, bh, b, h, hk, ni] = QueryBlock(s, kBM);
  const int warp = threadIdx.x / 32;
  const Lane ln = Lane::of_thread();
  const float scale = static_cast<float>(s.scale);

  // K and V move in by cp.async while the warps compute: K(j) during dP = dO V(j)^T, V(j + 1) during
  // S = Q K(j)^T and dQ += dS K(j).
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  KeyTiles tiles(i0, i0 + ni, w);
  load_rows<T, D>(static_cast<const T*>(p.q), b, i0, ni, L, s.heads, h, sq);
  load_rows<T, D>(static_cast<const T*>(p.dout), b, i0, ni, L, s.heads, h, sdo);
  load_stats<kBM>(static_cast<const float*>(p.lse) + bh * L, static_cast<const float*>(p.delta) + bh * L, i0, ni,
                  slse, sdelta, scale);
  load_rows<T, D>(v, b, tiles.j0, tiles.size(), L, s.kv_heads, hk, sv);
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[n][e] = 0.0f;
  }
  while (!tiles.done()) {
    const int j0 = tiles.j0, nj = tiles.size();
    cp_async_wait_all();
    __syncthreads();  // V(j0) (and Q, dO, the statistics) are in; every warp is done with the previous sk
    load_rows<T, D>(k, b, j0, nj, L, s.kv_heads, hk, sk);
    float sc[kBN / 8][4], dp[kBN / 8][4];
    warp_abt<T, D>(sdo, sv, 16 * warp, ln, dp);  // dP = dO V^T
    cp_async_wait_all();
    __syncthreads();  // K(j0) is in; every warp is done with sv
    tiles.next();
    if (!tiles.done()) load_rows<T, D>(v, b, tiles.j0, tiles.size(), L, s.kv_heads, hk, sv);
    warp_abt<T, D>(sq, sk, 16 * warp, ln, sc);  // S = Q K^T
    if (nj < kBN || !swa_tile_full(i0, i0 + ni, j0, j0 + nj, w.window, w.sink)) {
      TileMask(i0, j0, nj, w).apply(sc, 16 * warp, ln);
    }
    p_and_ds(sc, dp, warp, ln, scale, [&](int r, int) { return slse[r]; }, [&](int r, int) { return sdelta[r]; });
    warp_px<T, D>(dp, sk, 0, ln, dq);  // dQ += scale dS K
  }
  const float one[2] = {1.0f, 1.0f};
  store_rows<T, D>(dq, one, static_cast<T*>(p.dq), b, i0, 0, 16 * warp, ni, L, s.heads, h, ln);
}

// Above 48 KB of dynamic shared memory a kernel must opt in; the glue has checked smem_bytes against the
// device's opt-in limit (swa_cuda_smem_bytes), and any failure here is reported by its launch check.
template <typename Kernel, typename Params>
void launch(Kernel kernel, dim3 grid, int64_t smem_bytes, const Params& p, cudaStream_t stream) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
}

template <typename T, int D>
void forward(const SwaFwdParams& p, cudaStream_t stream) {
  constexpr int kRows = 64 * fwd_row_blocks<D>();
  const dim3 grid((p.s.seqlen + kRows - 1) / kRows, p.s.batch * p.s.heads);
  launch(swa_fwd_kernel<T, D>, grid, fwd_smem_bytes<T, D>(), p, stream);
}

template <typename T, int D>
void backward(const SwaBwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.s.batch * p.s.seqlen * p.s.heads;
  const dim3 grid_rows((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  swa_bwd_delta_kernel<T, D><<<grid_rows, kThreads, 0, stream>>>(p);
  if (swa_sm90_applies(D, p.cc)) return swa_backward_sm90(p, stream);
  const dim3 grid_kv((p.s.seqlen + kBN - 1) / kBN, p.s.batch * p.s.kv_heads, D / dkdv_cols<D>());
  launch(swa_bwd_dkdv_kernel<T, D>, grid_kv, bwd_smem_bytes<T, D>(), p, stream);
  const dim3 grid_q((p.s.seqlen + kBM - 1) / kBM, p.s.batch * p.s.heads);
  launch(swa_bwd_dq_kernel<T, D>, grid_q, bwd_smem_bytes<T, D>(), p, stream);
}

// Calls fn.template operator()<T, D>() for the runtime dtype (float16 / bfloat16) and headdim.
template <typename Fn>
void dispatch(DType dtype, int64_t headdim, Fn fn) {
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (headdim) {
      case 32: fn.template operator()<T, 32>(); break;
      case 64: fn.template operator()<T, 64>(); break;
      case 96: fn.template operator()<T, 96>(); break;
      case 128: fn.template operator()<T, 128>(); break;
      default: fn.template operator()<T, 256>(); break;  // the glue admits only these five
    }
  });
}

}  // namespace

int64_t swa_cuda_smem_bytes(int64_t headdim, int cc, bool backward) {
  if (swa_sm90_applies(headdim, cc)) {
    return backward ? swa_bwd_sm90_smem_bytes(headdim) : swa_fwd_sm90_smem_bytes(headdim);
  }
  // float16 and bfloat16 tiles have the same size: __half stands for both
  int64_t bytes = 0;
  dispatch(DType::kFloat16, headdim, [&]<typename T, int D>() {
    bytes = backward ? bwd_smem_bytes<T, D>() : fwd_smem_bytes<T, D>();
  });
  return bytes;
}

void swa_forward_cuda(const SwaFwdParams& p, cudaStream_t stream) {
  if (swa_sm90_applies(p.s.headdim, p.cc)) return swa_forward_sm90(p, stream);
  dispatch(p.s.dtype, p.s.headdim, [&]<typename T, int D>() { forward<T, D>(p, stream); });
}

void swa_backward_cuda(const SwaBwdParams& p, cudaStream_t stream) {
  dispatch(p.s.dtype, p.s.headdim, [&]<typename T, int D>() { backward<T, D>(p, stream); });
}

}  // namespace markovkit
