// CUDA sliding-window attention backward for Hopper (sm_90a), float16 / bfloat16, headdim 64 and 128: the dK, dV
// and dQ kernels of swa_kernel.cu's backward (which runs its delta kernel first) with the products on wgmma.
//
// Two warpgroups (256 threads) per CTA over 128 rows, 64 each: a 64-row block is one m64 operand, warp w holding
// rows [16 w, 16 w + 16) of the accumulators (swa_wgmma.cuh); the tiles the loop walks (64 rows) serve both
// warpgroups, and a warpgroup skips those none of its rows meets. dK, dV kernel: CTA per (128 keys, batch * kv
// head), over the query tiles of every head of the group that see them (QueryTiles): S^T = K Q^T and dP^T = V dO^T
// (m64n64k16, both operands K-major in shared memory), P^T and scale dS^T (p_and_ds) rounded to 16 bits in
// registers as the A operands of dV += P^T dO and dK += dS^T Q (m64nDk16; dO and Q, the same tiles, read
// MN-major). dQ kernel: CTA per (128 queries, batch * head), over its key tiles (KeyTiles): dP = dO V^T,
// S = Q K^T, dQ += scale dS K (dS stored to shared memory as the A operand), the dQ product of one tile in flight
// while dS of the next is made (as the forward's P V). The walked tiles (Q, dO and their statistics; K and V) load
// by cp.async behind the products of the tile before, one barrier per tile: two stages in dK, dV, three in dQ (its
// held product still reads tile t - 1 while t + 1 loads). Deterministic: no atomics, a fixed order of sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "attention/swa_device.cuh"
#include "attention/swa_params.h"
#include "attention/swa_sm90.cuh"

namespace markovkit {
namespace {
using namespace swa_cuda;

constexpr int kThreads = 256;  // two warpgroups
constexpr int kRows = 128;     // keys per dK, dV CTA and queries per dQ CTA: 64 per warpgroup

// The stages of the walked tiles. dQ: 3, as its held product of tile t still reads K(t) while tile t + 1's products
// run and tile t + 2 loads; dK, dV: 2. The bytes of the dQ kernel's dS, a 64 x 64 A operand held in shared memory
// from one step to the next.
constexpr int kDqStages = 3;
constexpr int kDkdvStages = 2;
template <typename T>
constexpr int kHeldTile = tile_bytes<T, 64, 64>();

// Two fixed 128-row tiles, kStages stages of two 64-row tiles, kExtra bytes (held tiles, statistics); and the slack
// to align the base.
template <typename T, int D, int kStages, int kExtra>
constexpr int smem_bytes() {
  return kAlign + 2 * tile_bytes<T, D, kRows>() + 2 * kStages * tile_bytes<T, D, 64>() + kExtra;
}

// Shared memory per CTA. dK, dV: 128 statistics per stage (64 lse, 64 delta); dQ: the two warpgroups' dS, 256
// statistics (128 lse, 128 delta).
template <typename T, int D>
constexpr int kSmemDkdv = smem_bytes<T, D, kDkdvStages, 128 * kDkdvStages * sizeof(float)>();
template <typename T, int D>
constexpr int kSmemDq = smem_bytes<T, D, kDqStages, 2 * kHeldTile<T> + 2 * kRows * sizeof(float)>();

// dK, dV of key tile blockIdx.x (128 keys) for (batch, kv head) blockIdx.y.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_bwd_dkdv_sm90_kernel(const SwaBwdParams p) {
  constexpr int kTile = tile_bytes<T, D, 64>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sk = aligned_base(smem_raw);
  unsigned char* sv = sk + tile_bytes<T, D, kRows>();
  unsigned char* stages = sv + tile_bytes<T, D, kRows>();       // stage s: Q at 2 s kTile, dO at (2 s + 1) kTile
  float* stats = reinterpret_cast<float*>(stages + 4 * kTile);  // stage s: lse2 at 128 s, scale delta at + 64

  const SwaShape& s = p.s;
  const Window w(s);
  const int64_t L = s.seqlen;
  const int group = static_cast<int>(s.heads / s.kv_heads);
  const auto [j0, b, hk, nj, q_end] = KeyBlock(s, kRows);
  const int warp = threadIdx.x / 32, wg = warp_uniform(warp / 4);
  const auto [wk0, wk1] = row_span(j0, 64 * wg, 64, nj);  // the warpgroup's keys
  const Lane ln = Lane::of_thread();
  const float scale = static_cast<float>(s.scale);

  // the query tiles' loaders, at head 0: a load names the head of the group it reads
  const TileLoader<T, D, kBM, kThreads> q_tiles(static_cast<const T*>(p.q), b, L, s.heads, 0),
      do_tiles(static_cast<const T*>(p.dout), b, L, s.heads, 0);
  // Q and dO of a tile start loading into a stage; its statistics into registers (next_stats), which the next
  // step stores to the stage before its barrier: the loads' latency then passes behind this step's products
  // instead of stalling warps 0 and 1 (and with them their warpgroup's wgmma) before them.
  RowStats<kBM> next_stats;
  const auto load_query_tile = [&](const QueryTiles& t, int stage) {
    unsigned char* at = stages + 2 * stage * kTile;
    q_tiles.load(t.i0, t.size(), at, t.h);
    do_tiles.load(t.i0, t.size(), at + kTile, t.h);
    const int64_t row0 = (b * s.heads + t.h) * L;
    next_stats.load(static_cast<const float*>(p.lse) + row0, static_cast<const float*>(p.delta) + row0, t.i0,
                    t.size());
  };
  QueryTiles tiles(hk * group, (hk + 1) * group, j0, q_end);
  TileLoader<T, D, kRows, kThreads>(static_cast<const T*>(p.k), b, L, s.kv_heads, hk).load(j0, nj, sk);
  TileLoader<T, D, kRows, kThreads>(static_cast<const T*>(p.v), b, L, s.kv_heads, hk).load(j0, nj, sv);
  load_query_tile(tiles, 0);
  float dk[D / 8][4], dv[D / 8][4];
  zero<D>(dk);
  zero<D>(dv);
  // Tile t: S^T, dP^T -> wait -> P^T, dS^T in registers -> dV, dK -> wait. Stage t % 2 holds Q(t), dO(t) and their
  // statistics; tile t + 1 loads into the other stage, which every warp is done with at the barrier. Not pipelined:
  // holding dV, dK of tile t in flight beside S^T, dP^T of tile t + 1 (5a102fc: P^T, dS^T through shared memory, as
  // they spill in registers at headdim 128; three stages) made the kernel 4-17% slower on an H200 (run 5).
  for (int stage = 0; !tiles.done(); stage ^= 1) {
    const int i0 = tiles.i0, ni = tiles.size();
    const int stage_u = warp_uniform(stage);  // for the wgmma descriptors of the stage's tiles
    const unsigned char* sq = stages + 2 * stage_u * kTile;
    const unsigned char* sdo = sq + kTile;
    float* slse = stats + 128 * stage;
    float* sdelta = slse + 64;
    next_stats.store(slse, sdelta, scale);  // this tile's, loaded one iteration ago
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();  // Q, dO, the statistics of (h, i0) (and K, V) are in; every warp is done with the other stage
    tiles.next();
    if (!tiles.done()) load_query_tile(tiles, stage ^ 1);
    // warpgroup-uniform, as wgmma needs
    if (wk0 >= wk1 || swa_tile_empty(i0, i0 + ni, wk0, wk1, w.window, w.sink)) continue;
    float st[kBN / 8][4], dpt[kBN / 8][4];  // S^T, dP^T: rows are keys, cols are queries
    wgmma_fence();
    ss_abt<T, D, kRows>(st, sk, wg, sq);
    ss_abt<T, D, kRows>(dpt, sv, wg, sdo);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(st);
    fence_operands(dpt);
    // masked only where the window cuts the tiles, as full tiles: queries beyond ni have P = 0 (lse = inf), keys
    // beyond nj are zero rows whose dK, dV rows are not stored
    if (!swa_tile_full(i0, i0 + ni, wk0, wk1, w.window, w.sink)) {
      KeyRowMask(i0, j0, w).apply(st, 16 * warp, ln);
    }
    // the statistics of the thread's 16 queries (columns 8 n + 2 t and the next): 8-byte loads
    float2 lse_c[kBN / 8], delta_c[kBN / 8];
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n) {
      lse_c[n] = *reinterpret_cast<const float2*>(slse + 8 * n + 2 * ln.t);
      delta_c[n] = *reinterpret_cast<const float2*>(sdelta + 8 * n + 2 * ln.t);
    }
    const auto at = [](const float2 (&v)[kBN / 8], int c) { return c % 2 == 0 ? v[c / 8].x : v[c / 8].y; };
    p_and_ds(st, dpt, warp, ln, scale, [&](int, int c) { return at(lse_c, c); },
             [&](int, int c) { return at(delta_c, c); });
    uint32_t pa[kBN / 16][4], dsa[kBN / 16][4];
    to_a<T>(st, pa);
    to_a<T>(dpt, dsa);
    wgmma_fence();
    rs_ax<T, D>(dv, pa, sdo);  // dV += P^T dO
    rs_ax<T, D>(dk, dsa, sq);  // dK += scale dS^T Q
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dv);
    fence_operands(dk);
  }
  const float one[2] = {1.0f, 1.0f};
  store_rows<T, D>(dk, one, static_cast<T*>(p.dk), b, j0, 0, 16 * warp, nj, L, s.kv_heads, hk, ln);
  store_rows<T, D>(dv, one, static_cast<T*>(p.dv), b, j0, 0, 16 * warp, nj, L, s.kv_heads, hk, ln);
}

// dQ of query tile blockIdx.x (128 queries) for (batch, head) blockIdx.y.
// At headdim 64, two CTAs per SM: 128 registers, and 32 bytes spilled (nvcc 13.0).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, D == 64 ? 2 : 1) swa_bwd_dq_sm90_kernel(const SwaBwdParams p) {
  constexpr int kTile = tile_bytes<T, D, 64>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sq = aligned_base(smem_raw);
  unsigned char* sdo = sq + tile_bytes<T, D, kRows>();
  unsigned char* stages = sdo + tile_bytes<T, D, kRows>();  // stage s: K at 2 s kTile, V at (2 s + 1) kTile
  unsigned char* held = stages + 2 * kDqStages * kTile;     // warpgroup w: dS at w kHeldTile
  float* slse = reinterpret_cast<float*>(held + 2 * kHeldTile<T>);
  float* sdelta = slse + kRows;

  const SwaShape& s = p.s;
  const Window w(s);
  const int64_t L = s.seqlen;
  const auto [i0, bh, b, h, hk, ni] = QueryBlock(s, kRows);
  const int warp = threadIdx.x / 32, wg = warp_uniform(warp / 4);
  const auto [g0, g1] = row_span(i0, 64 * wg, 64, ni);     // the warpgroup's rows as queries
  const auto [wi0, wi1] = row_span(i0, 16 * warp, 16, ni);  // the warp's
  unsigned char* sds = held + wg * kHeldTile<T>;
  const Lane ln = Lane::of_thread();
  const float scale = static_cast<float>(s.scale);

  const TileLoader<T, D, kBN, kThreads> k_tiles(static_cast<const T*>(p.k), b, L, s.kv_heads, hk),
      v_tiles(static_cast<const T*>(p.v), b, L, s.kv_heads, hk);
  const auto load_kv = [&](const KeyTiles<>& t, unsigned char* at) {  // K at `at`, V right after it
    k_tiles.load(t.j0, t.size(), at);
    v_tiles.load(t.j0, t.size(), at + kTile);
  };
  KeyTiles tiles(i0, i0 + ni, w);
  TileLoader<T, D, kRows, kThreads>(static_cast<const T*>(p.q), b, L, s.heads, h).load(i0, ni, sq);
  TileLoader<T, D, kRows, kThreads>(static_cast<const T*>(p.dout), b, L, s.heads, h).load(i0, ni, sdo);
  load_stats<kRows>(static_cast<const float*>(p.lse) + bh * L, static_cast<const float*>(p.delta) + bh * L, i0, ni,
                    slse, sdelta, scale);
  load_kv(tiles, stages);
  cp_async_wait_all();
  __syncthreads();  // Q, dO are in
  // in registers at headdim 128 (the two SS products would take the whole shared-memory bandwidth); at 64 they
  // would spill at two CTAs per SM
  const RowsA<T, D, D == 128> qa(sq, wg), doa(sdo, wg);
  float dq[D / 8][4];
  zero<D>(dq);
  // Step t of (number of tiles) + 1 has S(t), dP(t) and dQ += dS(t - 1) K(t - 1) in flight together, and dS(t) is
  // made while the tensor cores still work on the latter (pipeline_step), then stored to the warpgroup's sds tile as
  // the A operand of the next step (in registers it would spill at headdim 64 and two CTAs per SM). Stage
  // t % kDqStages holds K(t), V(t); K(t + 1), V(t + 1) load into stage (t + 1) % kDqStages, which the products of
  // step t - 1 (dQ of tile t - 2 among them) are done with.
  bool pending = false;
  for (int t = 0;; ++t) {
    const bool has_tile = !tiles.done();
    const int j0 = tiles.j0, nj = has_tile ? tiles.size() : 0;
    const unsigned char* sk = stages + 2 * (t % kDqStages) * kTile;
    const unsigned char* sv = sk + kTile;
    const unsigned char* sk_last = stages + 2 * ((t + kDqStages - 1) % kDqStages) * kTile;  // K(t - 1)
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();  // K(t), V(t) (and Q, dO, the statistics) are in; every warp is done with step t - 1
    if (has_tile) {
      tiles.next();
      if (!tiles.done()) load_kv(tiles, stages + 2 * ((t + 1) % kDqStages) * kTile);
    }
    // warpgroup-uniform, as wgmma needs
    const bool sees = has_tile && g0 < g1 && !swa_tile_empty(g0, g1, j0, j0 + nj, w.window, w.sink);
    float sc[kBN / 8][4], dp[kBN / 8][4];
    const auto issue_sdp = [&] {
      wgmma_fence();
      doa.abt(dp, sv);  // dP = dO V^T
      qa.abt(sc, sk);   // S = Q K^T
      wgmma_commit();
    };
    const auto issue_dq = [&] {
      wgmma_fence();
      ss_ax<T, D>(dq, sds, sk_last);  // dQ += scale dS K
      wgmma_commit();
    };
    // masked where the window cuts the tiles or the tile has fewer than kBN keys: the zero rows of K beyond nj
    // have S = 0, so P = e^-lse, which overflows dS (stored as T) where lse is very negative (inf times their zero
    // K rows is NaN); queries beyond ni have P = 0 (lse = inf)
    const auto make_ds = [&] {
      fence_operands(sc);
      fence_operands(dp);
      if (nj < kBN || !swa_tile_full(wi0, wi1, j0, j0 + nj, w.window, w.sink)) {
        TileMask(i0, j0, nj, w).apply(sc, 16 * warp, ln);
      }
      p_and_ds(sc, dp, warp, ln, scale, [&](int r, int) { return slse[r]; }, [&](int r, int) { return sdelta[r]; });
    };
    // a warp's rows of dS are the A rows of its own part of the held product, which its wait<0> has seen done; the
    // next step's barrier orders them before the product that reads them
    const auto hold = [&] {
      store_a<T>(dp, sds, 16 * (warp % 4), ln);
      fence_proxy_async();
    };
    pipeline_step(sees, pending, issue_sdp, issue_dq, make_ds, hold, [&] { fence_operands(dq); });
    pending = sees;
    if (!has_tile) break;
  }
  const float one[2] = {1.0f, 1.0f};
  store_rows<T, D>(dq, one, static_cast<T*>(p.dq), b, i0, 0, 16 * warp, ni, L, s.heads, h, ln);
}

template <typename T, int D>
void backward(const SwaBwdParams& p, cudaStream_t stream) {
  constexpr int kSmemKV = kSmemDkdv<T, D>, kSmemQ = kSmemDq<T, D>;
  const dim3 grid_kv((p.s.seqlen + kRows - 1) / kRows, p.s.batch * p.s.kv_heads);
  cudaFuncSetAttribute(swa_bwd_dkdv_sm90_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemKV);
  swa_bwd_dkdv_sm90_kernel<T, D><<<grid_kv, kThreads, kSmemKV, stream>>>(p);
  const dim3 grid_q((p.s.seqlen + kRows - 1) / kRows, p.s.batch * p.s.heads);
  cudaFuncSetAttribute(swa_bwd_dq_sm90_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemQ);
  swa_bwd_dq_sm90_kernel<T, D><<<grid_q, kThreads, kSmemQ, stream>>>(p);
}

}  // namespace

int64_t swa_bwd_sm90_smem_bytes(int64_t headdim) {
  int64_t bytes = 0;  // the larger kernel's; float16 and bfloat16 tiles have the same size
  dispatch_sm90(DType::kFloat16, headdim,
                [&]<typename T, int D>() { bytes = std::max(kSmemDkdv<T, D>, kSmemDq<T, D>); });
  return bytes;
}

void swa_backward_sm90(const SwaBwdParams& p, cudaStream_t stream) {
  dispatch_sm90(p.s.dtype, p.s.headdim, [&]<typename T, int D>() { backward<T, D>(p, stream); });
}

}  // namespace markovkit
