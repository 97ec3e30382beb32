// CUDA sliding-window attention forward for Hopper (sm_90a), float16 / bfloat16, headdim 64 and 128: wgmma.
//
// CTA = 2 warpgroups (256 threads) over a tile of 128 query rows; warpgroup w computes rows [64 w, 64 w + 64), and
// warp v of the CTA holds rows [16 v, 16 v + 16) of the accumulators (swa_wgmma.cuh). Per key tile of kN keys
// (KeyTiles; 128 at headdim 128, 64 at 64): S = Q K^T by D / 16 wgmma m64nNk16, Q in registers (loaded once: with
// both operands in shared memory this product alone would take the whole 128 bytes per clock shared memory gives),
// K read K-major; the mask and the online softmax of swa_device.cuh on the accumulators, P rounded to 16 bits in
// registers as the A operand of O += P V (kN / 16 wgmma m64nDk16, V read MN-major). The P V product of one tile runs on
// the tensor cores while the warpgroup's softmax works on the next tile's scores (FlashAttention-3's
// intra-warpgroup overlap). A warpgroup skips the key tiles none of its rows sees. K and V are double-buffered, V
// one tile behind K: the cp.async loads of K(t + 1) and V(t) run behind the products of S(t) and P(t - 1) V(t - 1),
// one barrier per tile. Shared memory: Q (128 x D), then two stages of K and V (64 x D each), in the
// 128-byte-swizzled tile layout of swa_wgmma.cuh, from a 1024-byte-aligned base.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention/swa_device.cuh"
#include "attention/swa_params.h"
#include "attention/swa_sm90.cuh"

namespace markovkit {
namespace {
using namespace swa_cuda;

constexpr int kRows = 128;     // query rows per CTA
constexpr int kThreads = 256;  // two warpgroups

// Keys per tile: at headdim 128, 128 (one CTA per SM either way: half the tiles, so half the per-tile barriers,
// waits and softmax bookkeeping, and wgmma m64n128 for S; ~250 registers, no spills); at 64, 64 (with 128 the two
// CTAs per SM, at 128 registers, would spill).
template <int D>
constexpr int kN = D == 128 ? 128 : 64;

// Q, two stages of K and V, and the slack to align the base.
template <typename T, int D>
constexpr int smem_bytes() {
  return kAlign + tile_bytes<T, D, kRows>() + 4 * tile_bytes<T, D, kN<D>>();
}

// At headdim 64 the kernel fits 128 registers without spills: two CTAs (16 warps) per SM, one's softmax beside the
// other's products; at 128 it needs ~250: one CTA.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, D == 64 ? 2 : 1) swa_fwd_sm90_kernel(const SwaFwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sq = aligned_base(smem_raw);
  unsigned char* stages = sq + tile_bytes<T, D, kRows>();  // stage s: K at s * 2 kKV, V at s * 2 kKV + kKV
  constexpr int kKV = tile_bytes<T, D, kN<D>>();

  const SwaShape& s = p.s;
  const Window w(s);
  const int64_t L = s.seqlen;
  const auto [i0, bh, b, h, hk, ni] = QueryBlock(s, kRows);
  const int warp = threadIdx.x / 32, wg = warp / 4, rb = 16 * warp;
  const auto [g0, g1] = row_span(i0, 64 * wg, 64, ni);  // the warpgroup's rows as queries
  const auto [wi0, wi1] = row_span(i0, rb, 16, ni);      // the warp's
  const Lane ln = Lane::of_thread();
  const float scale_log2 = static_cast<float>(s.scale) * kLog2e;

  const TileLoader<T, D, kN<D>, kThreads> k_tiles(static_cast<const T*>(p.k), b, L, s.kv_heads, hk),
      v_tiles(static_cast<const T*>(p.v), b, L, s.kv_heads, hk);
  KeyTiles<kN<D>> tiles(i0, i0 + ni, w);
  TileLoader<T, D, kRows, kThreads>(static_cast<const T*>(p.q), b, L, s.heads, h).load(i0, ni, sq);
  k_tiles.load(tiles.j0, tiles.size(), stages);
  cp_async_wait_all();
  __syncthreads();  // Q is in
  const RowsA<T, D, true> qa(sq, wg);
  float o[D / 8][4];
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // as in swa_kernel.cu's forward
  zero<D>(o);
  uint32_t pa[kN<D> / 16][4];  // while `pending`: P of the last tile the warpgroup saw (as the A operand)
  float alpha[2];              // and the factor that takes O to the maxima P was taken at
  bool pending = false;
  // Step t of (number of tiles) + 1: S(t) = Q K(t)^T and O += P(t - 1) V(t - 1) are in flight together, and the
  // softmax of S(t) runs while the tensor cores still work on the latter. Meanwhile K(t + 1) and V(t) load: stage
  // t % 2 holds K(t) and V(t), the other K(t + 1) and V(t - 1).
  for (int stage = 0;; stage ^= 1) {
    const bool has_tile = !tiles.done();
    const int j0 = tiles.j0, nj = has_tile ? tiles.size() : 0;
    unsigned char* sk = stages + stage * 2 * kKV;              // K(t), then V(t)
    unsigned char* sk_other = stages + (stage ^ 1) * 2 * kKV;  // K(t + 1), then V(t - 1)
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();  // K(t), V(t - 1) are in; every warp is done with K(t - 1) and V(t - 2)
    if (has_tile) {
      v_tiles.load(j0, nj, sk + kKV);
      tiles.next();
      if (!tiles.done()) k_tiles.load(tiles.j0, tiles.size(), sk_other);
    }
    // warpgroup-uniform, as wgmma needs
    const bool sees = has_tile && g0 < g1 && !swa_tile_empty(g0, g1, j0, j0 + nj, w.window, w.sink);
    float sc[kN<D> / 8][4];
    const auto issue_s = [&] {
      wgmma_fence();
      qa.abt(sc, sk);  // S = Q K^T
      wgmma_commit();
    };
    const auto issue_pv = [&] {
      if (alpha[0] != 1.0f || alpha[1] != 1.0f) rescale<D>(o, alpha);  // mostly 1 (kSlack)
      wgmma_fence();
      rs_ax<T, D>(o, pa, sk_other + kKV);  // O += P V
      wgmma_commit();
    };
    // The mask where the tile needs it, and the softmax step. softmax_rows sits in both branches on purpose: ptxas
    // hoists a wgmma wait to the top of its basic block, so the wait for P V that follows would otherwise run before
    // the softmax instead of behind it.
    const auto softmax = [&] {
      fence_operands(sc);
      if (nj < kN<D> || !swa_tile_full(wi0, wi1, j0, j0 + nj, w.window, w.sink)) {
        TileMask(i0, j0, nj, w).apply(sc, rb, ln);
        softmax_rows(sc, m, l, alpha, scale_log2);
      } else {
        softmax_rows(sc, m, l, alpha, scale_log2);
      }
    };
    pipeline_step(
        sees, pending, issue_s, issue_pv, softmax, [&] { to_a<T>(sc, pa); }, [&] { fence_operands(o); });
    pending = sees;
    if (!has_tile) break;
  }
  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    l[half] = quad_sum(l[half]);
    inv[half] = l[half] > 0.0f ? 1.0f / l[half] : 0.0f;
  }
  store_rows<T, D>(o, inv, static_cast<T*>(p.out), b, i0, 0, rb, ni, L, s.heads, h, ln);
  if (ln.t == 0) {
    float* lse = static_cast<float*>(p.lse) + bh * L;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = rb + ln.g + 8 * half;
      if (r < ni) lse[i0 + r] = (m[half] + log2f(l[half])) / kLog2e;
    }
  }
}

template <typename T, int D>
void forward(const SwaFwdParams& p, cudaStream_t stream) {
  const dim3 grid((p.s.seqlen + kRows - 1) / kRows, p.s.batch * p.s.heads);
  cudaFuncSetAttribute(swa_fwd_sm90_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<T, D>());
  swa_fwd_sm90_kernel<T, D><<<grid, kThreads, smem_bytes<T, D>(), stream>>>(p);
}

}  // namespace

bool swa_sm90_applies(int64_t headdim, int cc) {
#ifdef MARKOVKIT_SM90A
  return cc == 90 && (headdim == 64 || headdim == 128);
#else
  return false;
#endif
}

int64_t swa_fwd_sm90_smem_bytes(int64_t headdim) {
  int64_t bytes = 0;  // float16 and bfloat16 tiles have the same size: __half stands for both
  dispatch_sm90(DType::kFloat16, headdim, [&]<typename T, int D>() { bytes = smem_bytes<T, D>(); });
  return bytes;
}

void swa_forward_sm90(const SwaFwdParams& p, cudaStream_t stream) {
  dispatch_sm90(p.s.dtype, p.s.headdim, [&]<typename T, int D>() { forward<T, D>(p, stream); });
}

}  // namespace markovkit
