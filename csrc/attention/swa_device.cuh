#pragma once
// Device pieces shared by the attention's CUDA kernels (swa_kernel.cu: mma.sync, any headdim;
// swa_fwd_sm90_kernel.cu, swa_bwd_sm90_kernel.cu: the sm_90a wgmma kernels): fragment packing, the key-tile and
// query-tile walks and the masks, the online softmax of a 16-row block, the backward's P and dS, the output store.
// Fragment layouts: swa_kernel.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "attention/swa_params.h"

namespace markovkit {
namespace swa_cuda {

constexpr int kBN = 64;  // keys per tile
constexpr int kBM = 64;  // query rows per tile of the backward
constexpr float kLog2e = 1.4426950408889634f;

// Two floats as a 32-bit pair of T, lo in the low half (the smaller index, as the fragments want).
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

template <>
__device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

struct Lane {
  int g, t;  // lane = 4 g + t
  __device__ static Lane of_thread() {
    return {static_cast<int>(threadIdx.x % 32) / 4, static_cast<int>(threadIdx.x % 4)};
  }
};

// A launch's sequence length, window and sink as the kernels' 32-bit positions take them (check_inputs bounds
// them below 2^31 - 256: a tile's end, up to 256 past the last position, fits too). Positions, heads and batch
// indices are int from here on; offsets into the tensors are 64-bit.
struct Window {
  int seqlen, window, sink;
  __device__ explicit Window(const SwaShape& s)
      : seqlen(static_cast<int>(s.seqlen)), window(static_cast<int>(s.window)), sink(static_cast<int>(s.sink)) {}
};

// The query tile of a CTA of a forward or dQ kernel (blockIdx x: tiles of `rows` queries, y: batch * heads): rows
// [i0, i0 + ni) of head h of batch b (bh = b * heads + h), which reads kv head hk.
struct QueryBlock {
  int i0, bh, b, h, hk, ni;
  __device__ QueryBlock(const SwaShape& s, int rows)
      : i0(static_cast<int>(blockIdx.x) * rows), bh(static_cast<int>(blockIdx.y)), b(bh / static_cast<int>(s.heads)),
        h(bh % static_cast<int>(s.heads)), hk(h / static_cast<int>(s.heads / s.kv_heads)),
        ni(min(rows, static_cast<int>(s.seqlen) - i0)) {}
};

// Rows [first, first + count) of a tile that starts at position r0 and holds n rows, as positions [begin, end)
// (empty where first >= n).
struct RowSpan {
  int begin, end;
};
__device__ __forceinline__ RowSpan row_span(int r0, int first, int count, int n) {
  return {r0 + first, r0 + min(first + count, n)};
}

// The key tile of a CTA of a dK, dV kernel (blockIdx x: tiles of `rows` keys, y: batch * kv_heads): keys
// [j0, j0 + nj) of kv head hk of batch b, seen by queries in [j0, q_end) only.
struct KeyBlock {
  int j0, b, hk, nj, q_end;
  __device__ KeyBlock(const SwaShape& s, int rows)
      : j0(static_cast<int>(blockIdx.x) * rows), b(static_cast<int>(blockIdx.y / s.kv_heads)),
        hk(static_cast<int>(blockIdx.y % s.kv_heads)), nj(min(rows, static_cast<int>(s.seqlen) - j0)) {
    const Window w(s);
    q_end = swa_query_end(j0 + nj, w.seqlen, w.window, w.sink, j0);
  }
};

// A fragment (16 rows x 16 cols) from the C fragments of columns [0, 8) and [8, 16).
template <typename T>
__device__ __forceinline__ void c_to_a(const float (&left)[4], const float (&right)[4], uint32_t (&a)[4]) {
  a[0] = pack<T>(left[0], left[1]);
  a[1] = pack<T>(left[2], left[3]);
  a[2] = pack<T>(right[0], right[1]);
  a[3] = pack<T>(right[2], right[3]);
}

// The key tiles of query rows [i0, i1): [0, sink_end) then [window_begin, i1) (swa_params.h), kN keys at a
// time; the second range is never empty (it holds the rows' own keys).
template <int kN = kBN>
struct KeyTiles {
  int sink_end, window_begin, end;
  int j0;  // first key of the current tile
  __device__ KeyTiles(int i0, int i1, Window w)
      : sink_end(swa_sink_end(i0, w.window, w.sink)), window_begin(swa_window_begin(i0, w.window)), end(i1),
        j0(sink_end > 0 ? 0 : window_begin) {}
  __device__ bool done() const { return j0 >= end; }
  __device__ int size() const { return min(kN, (j0 < sink_end ? sink_end : end) - j0); }
  __device__ void next() {
    const bool in_sink = j0 < sink_end;
    j0 += kN;
    if (in_sink && j0 >= sink_end) j0 = window_begin;
  }
};

// The (head, query tile) pairs that meet a key tile: every head [h, h_end) of its group, queries [begin, end)
// kBM at a time.
struct QueryTiles {
  int h, h_end, begin, end;
  int i0;  // first query of the current tile
  __device__ QueryTiles(int h_begin, int h_end, int begin, int end)
      : h(h_begin), h_end(h_end), begin(begin), end(end), i0(begin) {}
  __device__ bool done() const { return h >= h_end; }
  __device__ int size() const { return min(kBM, end - i0); }
  __device__ void next() {
    i0 += kBM;
    if (i0 >= end) {
      i0 = begin;
      ++h;
    }
  }
};

// min(max(a - b, -256), 256) for a >= 0, without overflow for any a, b: the masks' 64-bit bounds in 32 bits, exact
// where they are compared with differences in (-256, 256).
__device__ __forceinline__ int clamped_diff(int64_t a, int64_t b) {
  return a - 256 > b ? 256 : static_cast<int>(max(a - b, int64_t{-256}));
}

// Sets the elements of the 16 x 8 kF block of C fragments of rows [rb, rb + 16) that a mask rejects to -inf.
// Element (n, e) is (row, col) = (rb + g + 8 (e / 2), 8 n + 2 t + e % 2): row_rule(row, 2 t) gives, once per row,
// the test of the constant k = 8 n + e % 2, so each element costs a few compares and a select, no branch.
template <int kF, typename RowRule>
__device__ __forceinline__ void mask_rows(float (&x)[kF][4], int rb, Lane ln, RowRule row_rule) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const auto visible = row_rule(rb + ln.g + 8 * half, 2 * ln.t);
#pragma unroll
    for (int n = 0; n < kF; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (!visible(8 * n + e)) x[n][2 * half + e] = -INFINITY;
      }
    }
  }
}

// swa_allowed(i0 + r, j0 + c) for the query rows r in [0, 128) and keys c in [0, nj) of a tile (C fragments: the
// forward's and dQ's scores), in 32-bit arithmetic.
struct TileMask {
  int nj, causal, window, sink;  // keys c < nj with r - c >= causal, and r - c < window or c < sink
  __device__ TileMask(int i0, int j0, int nj, Window w)
      : nj(nj), causal(clamped_diff(j0, i0)), window(clamped_diff(w.window, int64_t{i0} - j0)),
        sink(clamped_diff(w.sink, j0)) {}
  // The rejected elements of the 16 x 8 kF block of rows [rb, rb + 16) to -inf (mask_rows).
  template <int kF>
  __device__ __forceinline__ void apply(float (&x)[kF][4], int rb, Lane ln) const {
    mask_rows(x, rb, ln, [&](int r, int c0) {
      // key c0 + k visible: k < hi, and k > lo or k < sk
      const int hi = min(nj, r - causal + 1) - c0, lo = r - window - c0, sk = sink - c0;
      return [=](int k) { return (k < hi) & ((k > lo) | (k < sk)); };
    });
  }
};

// swa_allowed(i0 + c, j0 + r) for the key rows r in [0, 128) and queries c in [0, 64) of a tile (the dK, dV
// kernels' S^T), in 32-bit arithmetic. No bounds: the kernels' keys beyond the tile are zero rows whose dK, dV rows
// are not stored, their queries beyond it have P = 0 (lse = inf).
struct KeyRowMask {
  int lo, hi, sink;  // queries c >= r + lo, and c < r + hi or r < sink
  __device__ KeyRowMask(int i0, int j0, Window w)
      : lo(clamped_diff(j0, i0)), hi(clamped_diff(w.window, int64_t{i0} - j0)), sink(clamped_diff(w.sink, j0)) {}
  // As TileMask::apply.
  __device__ __forceinline__ void apply(float (&x)[kBN / 8][4], int rb, Lane ln) const {
    mask_rows(x, rb, ln, [&](int r, int c0) {
      // query c0 + k visible: k >= from, and k < to or the row is a sink key
      const int from = r + lo - c0, to = r + hi - c0;
      const bool sink_row = r < sink;
      return [=](int k) { return (k >= from) & ((k < to) | sink_row); };
    });
  }
};

// Writes the 16 rows [rb, rb + 16) of a tile (C fragments acc, times row_scale[half] for rows g and g + 8) as T
// to rows [r0 + rb, ...), columns [c0, c0 + kCols) of head h, only rows r < n.
template <typename T, int D, int kCols = D>
__device__ void store_rows(const float (&acc)[kCols / 8][4], const float (&row_scale)[2], T* dst, int64_t b,
                           int64_t r0, int c0, int rb, int64_t n, int64_t seqlen, int64_t nheads, int64_t h,
                           Lane ln) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = rb + ln.g + 8 * half;
    if (r >= n) continue;
    uint32_t* row = reinterpret_cast<uint32_t*>(dst + ((b * seqlen + r0 + r) * nheads + h) * D + c0);
#pragma unroll
    for (int c = 0; c < kCols / 8; ++c) {
      row[(8 * c + 2 * ln.t) / 2] =
          pack<T>(acc[c][2 * half] * row_scale[half], acc[c][2 * half + 1] * row_scale[half]);
    }
  }
}

// Max / sum over the 4 lanes (t = 0..3) that hold one row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// v[0] = op over v[0, 2 W), W a power of two, as a tree of depth log2(2 W).
template <int W, typename Op>
__device__ __forceinline__ void fold(float* v, Op op) {
#pragma unroll
  for (int i = 0; i < W; ++i) v[i] = op(v[i], v[i + W]);
  if constexpr (W > 1) fold<W / 2>(v, op);
}

// op over the lane's 2 kF elements of row g + 8 half of a 16 x 8 kF block of C fragments, as a tree: a dependent
// chain of log2(2 kF) ops, not 2 kF (the softmax's latency when a scheduler has two warps).
template <int kF, typename Op>
__device__ __forceinline__ float row_reduce(const float (&x)[kF][4], int half, Op op) {
  float v[2 * kF];
#pragma unroll
  for (int n = 0; n < kF; ++n) {
    v[2 * n] = x[n][2 * half];
    v[2 * n + 1] = x[n][2 * half + 1];
  }
  fold<kF>(v, op);
  return v[0];
}

// How far (log2 units) a row's scores may rise above the maximum its P are taken at before that maximum moves up:
// P <= 2^kSlack, and most steps leave the maxima and the output as they are (alpha = 1: no rescale).
constexpr float kSlack = 8.0f;

// One online-softmax step of a 16-row block: the scores sc (-inf where masked) become P = exp2(scale_log2 sc -
// m), m (log2 units) the reference maxima of rows g, g + 8, raised to a tile's row maximum where that exceeds them by
// more than kSlack (always at a row's first key); the lane's parts l of the row sums are rescaled to the new maxima
// and gain the sums of P; alpha gets the factor that rescales the output (rescale; 1 where m stayed). The maxima
// are taken on the raw scores (scale_log2 > 0 keeps their order), so the scale folds into one FFMA per score.
template <int kF>
__device__ __forceinline__ void softmax_rows(float (&sc)[kF][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                             float scale_log2) {
  float m_sub[2];  // the max to subtract, 0 while a row has seen no key (exp2(-inf) = 0)
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float m_tile = quad_max(row_reduce(sc, half, fmaxf)) * scale_log2;
    const bool raise = m_tile > m[half] + kSlack;
    alpha[half] = raise ? exp2f(m[half] - m_tile) : 1.0f;  // 0 from m = -inf
    if (raise) m[half] = m_tile;
    m_sub[half] = m[half] == -INFINITY ? 0.0f : m[half];
  }
#pragma unroll
  for (int n = 0; n < kF; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) sc[n][e] = exp2f(fmaf(sc[n][e], scale_log2, -m_sub[e / 2]));
  }
  const auto add = [](float a, float b) { return a + b; };
#pragma unroll
  for (int half = 0; half < 2; ++half) l[half] = l[half] * alpha[half] + row_reduce(sc, half, add);
}

// Output rows g, g + 8 (C fragments) times alpha[0], alpha[1].
template <int D>
__device__ __forceinline__ void rescale(float (&o)[D / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e / 2];
  }
}

// softmax_rows, then the output rescaled to the new maxima.
template <int D>
__device__ __forceinline__ void softmax_step(float (&sc)[kBN / 8][4], float (&m)[2], float (&l)[2],
                                             float (&o)[D / 8][4], float scale_log2) {
  float alpha[2];
  softmax_rows(sc, m, l, alpha, scale_log2);
  rescale<D>(o, alpha);
}

// P (in sc) and scale * dS (in dp) of a 16 x 64 score block held as C fragments. Element (n, e) is
// (row, col) = (16 w + g + 8 (e / 2), 8 n + 2 t + e % 2); lse2(row, col) (lse * log2 e) and delta_s(row, col)
// (scale * delta, RowStats) give its statistics: scale dS = P (scale dP - scale delta), one FFMA and a multiply.
// The scores must be -inf where masked (TileMask, KeyRowMask).
template <typename Lse, typename Delta>
__device__ __forceinline__ void p_and_ds(float (&sc)[kBN / 8][4], float (&dp)[kBN / 8][4], int warp, Lane ln,
                                         float scale, Lse lse2, Delta delta_s) {
  const float scale_log2 = scale * kLog2e;
#pragma unroll
  for (int n = 0; n < kBN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + ln.g + 8 * (e / 2);
      const int col = 8 * n + 2 * ln.t + (e % 2);
      const float pv = exp2f(sc[n][e] * scale_log2 - lse2(row, col));
      sc[n][e] = pv;
      dp[n][e] = pv * fmaf(dp[n][e], scale, -delta_s(row, col));
    }
  }
}

// The statistics of a thread's query row of a tile (threads < kRows, one row each) in two halves: load() reads
// lse and delta into registers, store() writes lse * log2(e) and scale * delta (p_and_ds) to shared memory (rows
// beyond the tile get P = 0), later where the global loads' latency should pass behind other work (a tile's
// products) rather than stall the warp.
template <int kRows>
struct RowStats {
  float lse = 0.0f, delta = 0.0f;
  bool in = false;  // a row of the tile
  __device__ void load(const float* lse_rows, const float* delta_rows, int i0, int n) {
    const int r = threadIdx.x;
    in = r < kRows && r < n;
    if (in) {
      lse = lse_rows[i0 + r];
      delta = delta_rows[i0 + r];
    }
  }
  __device__ void store(float* slse, float* sdelta, float scale) const {
    if (threadIdx.x < kRows) {
      slse[threadIdx.x] = in ? lse * kLog2e : INFINITY;
      sdelta[threadIdx.x] = in ? delta * scale : 0.0f;
    }
  }
};

// Loads lse * log2(e) and scale * delta of rows [i0, i0 + n) into slse, sdelta (kRows each) at once.
template <int kRows>
__device__ void load_stats(const float* lse, const float* delta, int i0, int n, float* slse, float* sdelta,
                           float scale) {
  RowStats<kRows> st;
  st.load(lse, delta, i0, n);
  st.store(slse, sdelta, scale);
}

// Calls fn(T{}) for the runtime dtype: __nv_bfloat16 for bfloat16, __half for float16 (the glue admits no other).
template <typename Fn>
void dispatch_half(DType dtype, Fn fn) {
  if (dtype == DType::kBFloat16) {
    fn(__nv_bfloat16{});
  } else {
    fn(__half{});
  }
}

}  // namespace swa_cuda
}  // namespace markovkit
