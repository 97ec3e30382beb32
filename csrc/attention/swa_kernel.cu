// CUDA sliding-window attention for float16 / bfloat16 with float32 accumulation, on tensor cores through
// nvcuda::wmma (16x16x16 tiles). Every CTA has 4 warps and a tile of 64 rows; each warp owns 16 of those
// rows, so the softmax bookkeeping needs only warp-level synchronization. The element-wise steps (mask,
// softmax, dS) go through shared memory, which keeps them independent of the accumulator fragment layout.
//
// Forward: CTA per (query tile of kBM rows, batch * head); key tiles of kBN keys over [0, sink_end) and
// [window_begin, i1) (swa_params.h), the mask evaluated only on tiles that are not fully visible; online
// softmax in base 2 with scale * log2(e) folded in; O is kept in shared memory (rescaled per row).
// Backward (deterministic, no atomics): one kernel per key tile for dK, dV (over the query tiles of every
// head of the group that see it) and one per query tile for dQ (over its key tiles), both recomputing
// P = exp(S - lse); dS = P (dP - delta) with delta = rowsum(dO O) - dlse from the glue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "attention/swa_params.h"

namespace markovkit {
namespace {

using namespace nvcuda;

constexpr int kBM = 64;  // query rows per tile
constexpr int kBN = 64;  // keys per tile
constexpr int kThreads = 128;
constexpr int kPadT = 8;  // row padding of 16-bit tiles (elements)
constexpr int kPadF = 4;  // row padding of float tiles (elements)
constexpr int kLdS = kBN + kPadF;  // float score rows; the same bytes hold the 16-bit P row (ld 2 * kLdS)
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Bytes rounded up to 128 so that every shared-memory region stays 256-bit aligned for wmma.
__host__ __device__ constexpr int64_t round128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

template <typename T, int D>
struct Tiles {
  static constexpr int kLdT = D + kPadT;  // 16-bit q/k/v/dout rows
  static constexpr int kLdO = D + kPadF;  // float accumulator rows
  static constexpr int64_t kRowsT = round128(int64_t{64} * kLdT * sizeof(T));  // a 64-row 16-bit tile
  static constexpr int64_t kScores = round128(int64_t{64} * kLdS * sizeof(float));
  static constexpr int64_t kStats = round128(64 * sizeof(float));
  static constexpr int64_t kAcc = round128(int64_t{64} * kLdO * sizeof(float));
  // forward: q, k, v, scores/P, O, m, l
  static constexpr int64_t kFwdBytes = 3 * kRowsT + kScores + kAcc + 2 * kStats;
  // backward: two 64-row pairs (q, dout) and (k, v), scores/P, dP/dS, lse, delta
  static constexpr int64_t kBwdBytes = 4 * kRowsT + 2 * kScores + 2 * kStats;
  static_assert(2 * kRowsT >= kAcc, "the float staging of dq/dk/dv reuses two 16-bit tiles");
};

// tile (kRows, D + kPadT) = rows [r0, r0 + n) of head h of a (batch, seqlen, nheads, D) tensor, zero beyond n.
template <typename T, int D>
__device__ void load_rows(const T* __restrict__ src, int64_t b, int64_t r0, int64_t n, int64_t seqlen,
                          int64_t nheads, int64_t h, T* tile) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = D / kVec;
  for (int x = threadIdx.x; x < 64 * kPerRow; x += kThreads) {
    const int r = x / kPerRow, c = (x % kPerRow) * kVec;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < n) val = *reinterpret_cast<const uint4*>(src + ((b * seqlen + r0 + r) * nheads + h) * D + c);
    *reinterpret_cast<uint4*>(tile + r * (D + kPadT) + c) = val;
  }
}

// Rows [16 w, 16 w + 16) of C (ldc floats) = A B^T over D, with A, B (64, D + kPadT) 16-bit tiles: the
// scores of warp w's rows against the 64 rows of B.
template <typename T, int D>
__device__ void warp_abt(const T* a_tile, const T* b_tile, float* c, int warp) {
  constexpr int kLd = D + kPadT;
  FragC acc[4];
#pragma unroll
  for (int n = 0; n < 4; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragA<T> a;
    wmma::load_matrix_sync(a, a_tile + 16 * warp * kLd + 16 * kk, kLd);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      FragB<T, wmma::col_major> bt;  // B^T(d, j) = B[j][d]
      wmma::load_matrix_sync(bt, b_tile + 16 * n * kLd + 16 * kk, kLd);
      wmma::mma_sync(acc[n], a, bt, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < 4; ++n) wmma::store_matrix_sync(c + 16 * warp * kLdS + 16 * n, acc[n], kLdS, wmma::mem_row_major);
}

// acc[n] (16 x 16 blocks of warp w's rows x D) += P (rows [16 w, 16 w + 16) of a 16-bit (64, 2 kLdS) tile)
// times X (64, D + kPadT).
template <typename T, int D>
__device__ void warp_px(const T* p_tile, const T* x_tile, FragC (&acc)[D / 16], int warp) {
  constexpr int kLd = D + kPadT;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    FragA<T> a;
    wmma::load_matrix_sync(a, p_tile + 16 * warp * (2 * kLdS) + 16 * kk, 2 * kLdS);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      FragB<T, wmma::row_major> x;
      wmma::load_matrix_sync(x, x_tile + 16 * kk * kLd + 16 * n, kLd);
      wmma::mma_sync(acc[n], a, x, acc[n]);
    }
  }
}

// Writes warp w's 16 accumulator rows, as T, to rows [r0 + 16 w, ...) of head h (only rows < n), staging
// them through `stage` (64, D + kPadF) floats.
template <typename T, int D>
__device__ void warp_store_rows(FragC (&acc)[D / 16], float* stage, T* dst, int64_t b, int64_t r0, int64_t n,
                                int64_t seqlen, int64_t nheads, int64_t h, int warp, int lane) {
  constexpr int kLdO = D + kPadF;
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
    wmma::store_matrix_sync(stage + 16 * warp * kLdO + 16 * c, acc[c], kLdO, wmma::mem_row_major);
  }
  __syncwarp();
  for (int rr = 0; rr < 16; ++rr) {
    const int r = 16 * warp + rr;
    if (r >= n) break;
    T* row = dst + ((b * seqlen + r0 + r) * nheads + h) * D;
    for (int d = lane; d < D; d += 32) row[d] = from_float<T>(stage[r * kLdO + d]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_fwd_kernel(const SwaFwdParams p) {
  using Tl = Tiles<T, D>;
  constexpr int kLdO = Tl::kLdO;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sk = reinterpret_cast<T*>(smem + Tl::kRowsT);
  T* sv = reinterpret_cast<T*>(smem + 2 * Tl::kRowsT);
  float* ss = reinterpret_cast<float*>(smem + 3 * Tl::kRowsT);  // scores, then P as T in place
  float* so = reinterpret_cast<float*>(smem + 3 * Tl::kRowsT + Tl::kScores);
  float* sm = reinterpret_cast<float*>(smem + 3 * Tl::kRowsT + Tl::kScores + Tl::kAcc);  // running max (log2)
  float* sl = sm + Tl::kStats / sizeof(float);                                          // running sum

  const SwaShape& s = p.s;
  const int64_t L = s.seqlen;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM, bh = blockIdx.y;
  const int64_t b = bh / s.heads, h = bh % s.heads, hk = h / (s.heads / s.kv_heads);
  const int64_t ni = min(static_cast<int64_t>(kBM), L - i0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = static_cast<float>(s.scale) * kLog2e;

  load_rows<T, D>(static_cast<const T*>(p.q), b, i0, ni, L, s.heads, h, sq);
  for (int x = threadIdx.x; x < kBM * kLdO; x += kThreads) so[x] = 0.0f;
  if (threadIdx.x < kBM) {
    sm[threadIdx.x] = -INFINITY;
    sl[threadIdx.x] = 0.0f;
  }
  const int64_t ranges[2][2] = {{0, swa_sink_end(i0, s.window, s.sink)}, {swa_window_begin(i0, s.window), i0 + ni}};
  for (int range = 0; range < 2; ++range) {
    for (int64_t j0 = ranges[range][0]; j0 < ranges[range][1]; j0 += kBN) {
      const int64_t nj = min(static_cast<int64_t>(kBN), ranges[range][1] - j0);
      __syncthreads();  // every warp is done with the previous sk, sv
      load_rows<T, D>(static_cast<const T*>(p.k), b, j0, nj, L, s.kv_heads, hk, sk);
      load_rows<T, D>(static_cast<const T*>(p.v), b, j0, nj, L, s.kv_heads, hk, sv);
      __syncthreads();
      const bool full = nj == kBN && swa_tile_full(i0, i0 + ni, j0, j0 + nj, s.window, s.sink);
      warp_abt<T, D>(sq, sk, ss, warp);
      __syncwarp();
      for (int rr = 0; rr < 16; ++rr) {
        const int r = 16 * warp + rr;
        const int64_t i = i0 + r;
        float* srow = ss + r * kLdS;
        float x[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int jj = lane + 32 * c;
          const bool ok = full || (jj < nj && swa_allowed(i, j0 + jj, s.window, s.sink));
          x[c] = ok ? srow[jj] * scale_log2 : -INFINITY;
        }
        const float m_old = sm[r];
        const float m_new = fmaxf(m_old, warp_max(fmaxf(x[0], x[1])));
        const bool empty = m_new == -INFINITY;  // no visible key so far (only rows beyond seqlen)
        const float alpha = m_old == -INFINITY ? (empty ? 1.0f : 0.0f) : exp2f(m_old - m_new);
        float sum = 0.0f;
        T* prow = reinterpret_cast<T*>(srow);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float pc = x[c] == -INFINITY ? 0.0f : exp2f(x[c] - m_new);
          sum += pc;
          prow[lane + 32 * c] = from_float<T>(pc);  // safe in place: every lane read its scores above
        }
        sum = warp_sum(sum);
        if (alpha != 1.0f) {
          for (int d = lane; d < D; d += 32) so[r * kLdO + d] *= alpha;
        }
        if (lane == 0) {
          sm[r] = m_new;
          sl[r] = sl[r] * alpha + sum;
        }
      }
      __syncwarp();
      FragC acc[D / 16];
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wmma::load_matrix_sync(acc[n], so + 16 * warp * kLdO + 16 * n, kLdO, wmma::mem_row_major);
      }
      warp_px<T, D>(reinterpret_cast<const T*>(ss), sv, acc, warp);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wmma::store_matrix_sync(so + 16 * warp * kLdO + 16 * n, acc[n], kLdO, wmma::mem_row_major);
      }
      __syncwarp();
    }
  }
  T* out = static_cast<T*>(p.out);
  float* lse = static_cast<float*>(p.lse) + bh * L;
  for (int rr = 0; rr < 16; ++rr) {
    const int r = 16 * warp + rr;
    if (r >= ni) break;
    const float inv = 1.0f / sl[r];
    T* row = out + ((b * L + i0 + r) * s.heads + h) * D;
    for (int d = lane; d < D; d += 32) row[d] = from_float<T>(so[r * kLdO + d] * inv);
    if (lane == 0) lse[i0 + r] = (sm[r] + log2f(sl[r])) / kLog2e;
  }
}

// Loads lse (scaled to log2) and delta of rows [i0, i0 + n) into slse, sdelta; rows beyond n get P = 0.
__device__ void load_stats(const float* lse, const float* delta, int64_t i0, int64_t n, float* slse,
                           float* sdelta) {
  if (threadIdx.x < 64) {
    const int r = threadIdx.x;
    slse[r] = r < n ? lse[i0 + r] * kLog2e : INFINITY;
    sdelta[r] = r < n ? delta[i0 + r] : 0.0f;
  }
}

// P and scale * dS of one score row (64 entries, two per lane) in place as T: p_row over the scores
// s_row, ds_row over dP. Column jj is (query i_of(jj), key j_of(jj)); lse2 = lse * log2(e).
template <typename T, typename Visible, typename Lse, typename Delta>
__device__ void p_ds_row(float* s_row, float* dp_row, Visible visible, Lse lse2_of, Delta delta_of,
                         float scale_log2, float scale, int lane) {
  float pv[2], dsv[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int jj = lane + 32 * c;
    pv[c] = visible(jj) ? exp2f(s_row[jj] * scale_log2 - lse2_of(jj)) : 0.0f;
    dsv[c] = pv[c] * (dp_row[jj] - delta_of(jj)) * scale;
  }
  __syncwarp();  // all lanes have read the float rows before they are overwritten
  T* p16 = reinterpret_cast<T*>(s_row);
  T* ds16 = reinterpret_cast<T*>(dp_row);
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    p16[lane + 32 * c] = from_float<T>(pv[c]);
    ds16[lane + 32 * c] = from_float<T>(dsv[c]);
  }
}

// dK, dV of key tile blockIdx.x for (batch, kv head) blockIdx.y; warp w owns keys [16 w, 16 w + 16).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_bwd_dkdv_kernel(const SwaBwdParams p) {
  using Tl = Tiles<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sdo = reinterpret_cast<T*>(smem + Tl::kRowsT);
  T* sk = reinterpret_cast<T*>(smem + 2 * Tl::kRowsT);
  T* sv = reinterpret_cast<T*>(smem + 3 * Tl::kRowsT);
  float* ss = reinterpret_cast<float*>(smem + 4 * Tl::kRowsT);  // S^T, then P^T as T
  float* sdp = reinterpret_cast<float*>(smem + 4 * Tl::kRowsT + Tl::kScores);  // dP^T, then scale dS^T as T
  float* slse = reinterpret_cast<float*>(smem + 4 * Tl::kRowsT + 2 * Tl::kScores);
  float* sdelta = slse + Tl::kStats / sizeof(float);

  const SwaShape& s = p.s;
  const int64_t L = s.seqlen, group = s.heads / s.kv_heads;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBN, bk = blockIdx.y;
  const int64_t b = bk / s.kv_heads, hk = bk % s.kv_heads;
  const int64_t nj = min(static_cast<int64_t>(kBN), L - j0);
  const int64_t q_end = swa_query_end(j0 + nj, L, s.window, s.sink, j0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale = static_cast<float>(s.scale), scale_log2 = scale * kLog2e;

  load_rows<T, D>(static_cast<const T*>(p.k), b, j0, nj, L, s.kv_heads, hk, sk);
  load_rows<T, D>(static_cast<const T*>(p.v), b, j0, nj, L, s.kv_heads, hk, sv);
  FragC dk[D / 16], dv[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(dk[n], 0.0f);
    wmma::fill_fragment(dv[n], 0.0f);
  }
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const float* lse = static_cast<const float*>(p.lse) + (b * s.heads + h) * L;
    const float* delta = static_cast<const float*>(p.delta) + (b * s.heads + h) * L;
    for (int64_t i0 = j0; i0 < q_end; i0 += kBM) {
      const int64_t ni = min(static_cast<int64_t>(kBM), q_end - i0);
      __syncthreads();  // every warp is done with the previous sq, sdo, slse, sdelta
      load_rows<T, D>(static_cast<const T*>(p.q), b, i0, ni, L, s.heads, h, sq);
      load_rows<T, D>(static_cast<const T*>(p.dout), b, i0, ni, L, s.heads, h, sdo);
      load_stats(lse, delta, i0, ni, slse, sdelta);
      __syncthreads();
      const bool full = nj == kBN && ni == kBM && swa_tile_full(i0, i0 + ni, j0, j0 + nj, s.window, s.sink);
      warp_abt<T, D>(sk, sq, ss, warp);   // S^T = K Q^T
      warp_abt<T, D>(sv, sdo, sdp, warp);  // dP^T = V dO^T
      __syncwarp();
      for (int rr = 0; rr < 16; ++rr) {
        const int r = 16 * warp + rr;  // key row; column c is query i0 + c
        const int64_t j = j0 + r;
        p_ds_row<T>(
            ss + r * kLdS, sdp + r * kLdS,
            [&](int c) { return full || (r < nj && c < ni && swa_allowed(i0 + c, j, s.window, s.sink)); },
            [&](int c) { return slse[c]; }, [&](int c) { return sdelta[c]; }, scale_log2, scale, lane);
      }
      __syncwarp();
      warp_px<T, D>(reinterpret_cast<const T*>(ss), sdo, dv, warp);  // dV += P^T dO
      warp_px<T, D>(reinterpret_cast<const T*>(sdp), sq, dk, warp);  // dK += scale dS^T Q
    }
  }
  __syncthreads();  // sq, sdo become the float staging area
  float* stage = reinterpret_cast<float*>(smem);
  warp_store_rows<T, D>(dk, stage, static_cast<T*>(p.dk), b, j0, nj, L, s.kv_heads, hk, warp, lane);
  __syncwarp();
  warp_store_rows<T, D>(dv, stage, static_cast<T*>(p.dv), b, j0, nj, L, s.kv_heads, hk, warp, lane);
}

// dQ of query tile blockIdx.x for (batch, head) blockIdx.y; warp w owns queries [16 w, 16 w + 16).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_bwd_dq_kernel(const SwaBwdParams p) {
  using Tl = Tiles<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sdo = reinterpret_cast<T*>(smem + Tl::kRowsT);
  T* sk = reinterpret_cast<T*>(smem + 2 * Tl::kRowsT);
  T* sv = reinterpret_cast<T*>(smem + 3 * Tl::kRowsT);
  float* ss = reinterpret_cast<float*>(smem + 4 * Tl::kRowsT);
  float* sdp = reinterpret_cast<float*>(smem + 4 * Tl::kRowsT + Tl::kScores);
  float* slse = reinterpret_cast<float*>(smem + 4 * Tl::kRowsT + 2 * Tl::kScores);
  float* sdelta = slse + Tl::kStats / sizeof(float);

  const SwaShape& s = p.s;
  const int64_t L = s.seqlen;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM, bh = blockIdx.y;
  const int64_t b = bh / s.heads, h = bh % s.heads, hk = h / (s.heads / s.kv_heads);
  const int64_t ni = min(static_cast<int64_t>(kBM), L - i0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale = static_cast<float>(s.scale), scale_log2 = scale * kLog2e;

  load_rows<T, D>(static_cast<const T*>(p.q), b, i0, ni, L, s.heads, h, sq);
  load_rows<T, D>(static_cast<const T*>(p.dout), b, i0, ni, L, s.heads, h, sdo);
  load_stats(static_cast<const float*>(p.lse) + bh * L, static_cast<const float*>(p.delta) + bh * L, i0, ni, slse,
             sdelta);
  FragC dq[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq[n], 0.0f);
  const int64_t ranges[2][2] = {{0, swa_sink_end(i0, s.window, s.sink)}, {swa_window_begin(i0, s.window), i0 + ni}};
  for (int range = 0; range < 2; ++range) {
    for (int64_t j0 = ranges[range][0]; j0 < ranges[range][1]; j0 += kBN) {
      const int64_t nj = min(static_cast<int64_t>(kBN), ranges[range][1] - j0);
      __syncthreads();  // every warp is done with the previous sk, sv
      load_rows<T, D>(static_cast<const T*>(p.k), b, j0, nj, L, s.kv_heads, hk, sk);
      load_rows<T, D>(static_cast<const T*>(p.v), b, j0, nj, L, s.kv_heads, hk, sv);
      __syncthreads();
      const bool full = nj == kBN && swa_tile_full(i0, i0 + ni, j0, j0 + nj, s.window, s.sink);
      warp_abt<T, D>(sq, sk, ss, warp);   // S = Q K^T
      warp_abt<T, D>(sdo, sv, sdp, warp);  // dP = dO V^T
      __syncwarp();
      for (int rr = 0; rr < 16; ++rr) {
        const int r = 16 * warp + rr;  // query row; column c is key j0 + c
        const int64_t i = i0 + r;
        p_ds_row<T>(
            ss + r * kLdS, sdp + r * kLdS,
            [&](int c) { return full || (c < nj && swa_allowed(i, j0 + c, s.window, s.sink)); },
            [&](int) { return slse[r]; }, [&](int) { return sdelta[r]; }, scale_log2, scale, lane);
      }
      __syncwarp();
      warp_px<T, D>(reinterpret_cast<const T*>(sdp), sk, dq, warp);  // dQ += scale dS K
    }
  }
  __syncthreads();  // sk, sv become the float staging area
  float* stage = reinterpret_cast<float*>(smem + 2 * Tl::kRowsT);
  warp_store_rows<T, D>(dq, stage, static_cast<T*>(p.dq), b, i0, ni, L, s.heads, h, warp, lane);
}

template <typename Kernel, typename Params>
void launch(Kernel kernel, dim3 grid, int64_t smem_bytes, const Params& p, cudaStream_t stream) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
}

template <typename T, int D>
void forward(const SwaFwdParams& p, cudaStream_t stream) {
  const dim3 grid((p.s.seqlen + kBM - 1) / kBM, p.s.batch * p.s.heads);
  launch(swa_fwd_kernel<T, D>, grid, Tiles<T, D>::kFwdBytes, p, stream);
}

template <typename T, int D>
void backward(const SwaBwdParams& p, cudaStream_t stream) {
  const dim3 grid_kv((p.s.seqlen + kBN - 1) / kBN, p.s.batch * p.s.kv_heads);
  launch(swa_bwd_dkdv_kernel<T, D>, grid_kv, Tiles<T, D>::kBwdBytes, p, stream);
  const dim3 grid_q((p.s.seqlen + kBM - 1) / kBM, p.s.batch * p.s.heads);
  launch(swa_bwd_dq_kernel<T, D>, grid_q, Tiles<T, D>::kBwdBytes, p, stream);
}

// Calls fn.template operator()<T, D>() for the runtime dtype (float16 / bfloat16) and headdim.
template <typename Fn>
void dispatch(DType dtype, int64_t headdim, Fn fn) {
  auto with_type = [&](auto tag) {
    using T = decltype(tag);
    switch (headdim) {
      case 32: fn.template operator()<T, 32>(); break;
      case 64: fn.template operator()<T, 64>(); break;
      case 96: fn.template operator()<T, 96>(); break;
      case 128: fn.template operator()<T, 128>(); break;
      default: fn.template operator()<T, 256>(); break;  // the glue admits only these five
    }
  };
  if (dtype == DType::kBFloat16) {
    with_type(__nv_bfloat16{});
  } else {
    with_type(__half{});
  }
}

}  // namespace

void swa_forward_cuda(const SwaFwdParams& p, cudaStream_t stream) {
  dispatch(p.s.dtype, p.s.headdim, [&]<typename T, int D>() { forward<T, D>(p, stream); });
}

void swa_backward_cuda(const SwaBwdParams& p, cudaStream_t stream) {
  dispatch(p.s.dtype, p.s.headdim, [&]<typename T, int D>() { backward<T, D>(p, stream); });
}

}  // namespace markovkit
