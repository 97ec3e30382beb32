#pragma once
// The CPU tile loops of sliding-window attention, free of torch headers so that swa_cpu.cpp can compile
// them once per instruction set (the wrapper namespace SWA_CPU_ISA differs per copy: no ODR clash).
//
// Forward, per (batch, head, query tile of kBM rows): online softmax over the key tiles of kBN keys in
// [0, sink_end) and [window_begin, i1); only tiles that are not fully visible evaluate the mask. Scores
// are held transposed (keys x queries, S^T = K Q^T): the query tile is transposed once, key rows are
// read in place, and the softmax statistics are vectors over the queries.
// Backward in two passes that share no output (deterministic, no atomics, results independent of the
// thread count), both recomputing P = exp(S - lse) and dS = P (dP - delta), delta = rowsum(dO O) - dlse:
// dK, dV per (batch, kv head, key tile) over the query tiles of every head of the group that see it, and
// dQ per (batch, head, query tile) over its key tiles (transposed scores, as in the forward).
// Tile products go through gemm_acc, a register-blocked loop nest on GCC vector types; the softmax loops
// (scale, max, exp, sum) use the same vectors.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention/swa_params.h"

#ifndef SWA_CPU_VEC_BYTES
#error "define SWA_CPU_VEC_BYTES (SIMD width in bytes) before including swa_cpu_tiles.h"
#endif

namespace markovkit {
namespace SWA_CPU_ISA {

constexpr int64_t kBM = 64;
constexpr int64_t kBN = 64;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
struct Rows {
  const T* base;
  int64_t seqlen, nheads, headdim;
  // Row of (b, i, h) in a (batch, seqlen, nheads, headdim) tensor; consecutive i are stride() apart.
  const T* at(int64_t b, int64_t i, int64_t h) const { return base + ((b * seqlen + i) * nheads + h) * headdim; }
  int64_t stride() const { return nheads * headdim; }
};

// SIMD vector of T, SWA_CPU_VEC_BYTES wide (16 for the baseline copy, 32 for AVX2, 64 for AVX-512).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(SWA_CPU_VEC_BYTES)));
  static constexpr int kLanes = SWA_CPU_VEC_BYTES / sizeof(T);
};

template <typename T>
using VecT = typename Vec<T>::type;
typedef int32_t VecI32 __attribute__((vector_size(SWA_CPU_VEC_BYTES)));

template <typename T>
VecT<T> splat(T x) {
  return VecT<T>{} + x;
}

template <typename T>
VecT<T> vload(const T* p) {
  VecT<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
void vstore(T* p, VecT<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// exp of each lane, for lanes <= 0 (float): Cody-Waite reduction and a degree-7 polynomial (Cephes expf),
// < 2 ulp; lanes below -87 give ~1e-38 instead of a smaller value, so -inf lanes must be selected away.
inline VecT<float> exp_nonpos(VecT<float> x) {
  using V = VecT<float>;
  x = x < -87.0f ? splat(-87.0f) : x;
  const V t = x * 1.44269504088896341f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(t, VecI32), V);  // trunc(t)
  n = n + __builtin_convertvector(n > t, V);                             // floor(t): -1 where trunc rounded up
  V r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const VecI32 bits = (__builtin_convertvector(n, VecI32) + 127) << 23;
  V two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

inline VecT<double> exp_nonpos(VecT<double> x) {
  for (int i = 0; i < Vec<double>::kLanes; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Register block of gemm_acc: kRows rows x kCols vectors of accumulators, kCols + 1 more registers for
// the B row and the broadcast A element: fits the 16 vector registers of SSE and AVX2.
constexpr int kRows = 4;
constexpr int kCols = 2;

// The part of a tile product that row block [m, m + kRows) needs: columns [n0, n1) of C and terms
// [k0, k1) of the sum (outside them the scores are masked, or A is zero).
struct Span {
  int64_t n0, n1, k0, k1;
};

// C (M, N) += A (M, K) B (K, N), with A(m, k) = A[m * a_rs + k * a_cs] and B, C row-major (ldb, ldc),
// over span(m) of each row block (columns rounded out to whole register blocks; the rest of C is left as
// it is; span(m).n1 <= N). M % kRows == 0 and N % (kCols * kLanes) == 0: the accumulators stay in registers.
template <typename T, typename SpanOf>
void gemm_acc(int64_t M, const T* __restrict A, int64_t a_rs, int64_t a_cs, const T* __restrict B,
              int64_t ldb, T* __restrict C, int64_t ldc, const SpanOf& span) {
  using V = VecT<T>;
  constexpr int kW = Vec<T>::kLanes;
  constexpr int64_t kBlock = kCols * kW;
  for (int64_t m = 0; m < M; m += kRows) {
    const Span sp = span(m);
    for (int64_t n = sp.n0 / kBlock * kBlock; n < sp.n1; n += kBlock) {
      V acc[kRows][kCols];
      for (int rr = 0; rr < kRows; ++rr) {
        for (int cc = 0; cc < kCols; ++cc) acc[rr][cc] = vload(C + (m + rr) * ldc + n + cc * kW);
      }
      for (int64_t k = sp.k0; k < sp.k1; ++k) {
        V b[kCols];
        for (int cc = 0; cc < kCols; ++cc) b[cc] = vload(B + k * ldb + n + cc * kW);
        for (int rr = 0; rr < kRows; ++rr) {
          const T a = A[(m + rr) * a_rs + k * a_cs];
          for (int cc = 0; cc < kCols; ++cc) acc[rr][cc] += a * b[cc];
        }
      }
      for (int rr = 0; rr < kRows; ++rr) {
        for (int cc = 0; cc < kCols; ++cc) vstore(C + (m + rr) * ldc + n + cc * kW, acc[rr][cc]);
      }
    }
  }
}

inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Keys [lo, hi) of the tile [j0, j0 + nj) seen by some query of [i, i + kRows) (a superset); empty from
// i_end on (padding rows). No overflow for windows up to INT64_MAX.
inline void keys_seen(const SwaShape& sh, int64_t i, int64_t i_end, int64_t j0, int64_t nj, int64_t& lo,
                      int64_t& hi) {
  if (i >= i_end) {
    lo = hi = 0;
    return;
  }
  lo = j0 < sh.sink || sh.window > i - j0 ? 0 : clamp64(i - j0 - sh.window + 1, 0, nj);
  hi = clamp64(i + kRows - j0, 0, nj);
}

// Queries [lo, hi) of the tile [i0, i0 + ni) that see some key of [j, j + kRows) (a superset); empty from
// j_end on (padding rows).
inline void queries_seeing(const SwaShape& sh, int64_t j, int64_t j_end, int64_t i0, int64_t ni, int64_t& lo,
                           int64_t& hi) {
  if (j >= j_end) {
    lo = hi = 0;
    return;
  }
  const int64_t j_last = j + kRows - 1;  // seen up to query j_last + window - 1
  lo = clamp64(j - i0, 0, ni);
  hi = j < sh.sink || sh.window >= i0 + ni - j_last ? ni : clamp64(j_last + sh.window - i0, 0, ni);
}

// Spans of the products of query tile [i0, i0 + ni) and key tile [j0, j0 + nj): `inner` is the length
// of the other dimension (headdim).
// Rows are queries, the keys are the columns (S, dP) or the terms (P V, dS K):
inline auto query_rows(const SwaShape& sh, int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool keys_are_terms,
                       int64_t inner) {
  return [=, &sh](int64_t m) {
    int64_t lo, hi;
    keys_seen(sh, i0 + m, i0 + ni, j0, nj, lo, hi);
    return keys_are_terms ? Span{0, inner, lo, hi} : Span{lo, hi, 0, inner};
  };
}

// Rows are keys, the queries are the columns (S^T, dP^T) or the terms (P^T dO, dS^T Q):
inline auto key_rows(const SwaShape& sh, int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool queries_are_terms,
                     int64_t inner) {
  return [=, &sh](int64_t m) {
    int64_t lo, hi;
    queries_seeing(sh, j0 + m, j0 + nj, i0, ni, lo, hi);
    return queries_are_terms ? Span{0, inner, lo, hi} : Span{lo, hi, 0, inner};
  };
}

template <typename T>
void fill_zero(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = T(0);
}

// dst: (kBM, headdim) = a * rows [i0, i0 + ni) of `src` (head h), zero beyond ni.
template <typename T>
void copy_rows(const Rows<T>& src, int64_t b, int64_t h, int64_t i0, int64_t ni, T a, T* dst) {
  const int64_t D = src.headdim;
  for (int64_t r = 0; r < kBM; ++r) {
    const T* row = r < ni ? src.at(b, i0 + r, h) : nullptr;
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = row ? a * row[d] : T(0);
  }
}

// kt: (headdim, kBN) = rows [j0, j0 + nj) of `src` (kv head hk) transposed, zero beyond nj.
template <typename T>
void transpose_tile(const Rows<T>& src, int64_t b, int64_t hk, int64_t j0, int64_t nj, T* kt) {
  const int64_t D = src.headdim;
  for (int64_t jj = 0; jj < kBN; ++jj) {
    const T* row = jj < nj ? src.at(b, j0 + jj, hk) : nullptr;
    for (int64_t d = 0; d < D; ++d) kt[d * kBN + jj] = row ? row[d] : T(0);
  }
}

// P = exp(scale * s - lse_i) in place of the scores s[:kBN] of query i against keys j0 + [0, kBN); 0 for
// keys outside the mask or beyond nj.
template <typename T>
void p_row(T* s, T scale, T lse_i, int64_t i, int64_t j0, int64_t nj, bool full, const SwaShape& sh) {
  using V = VecT<T>;
  constexpr int kW = Vec<T>::kLanes;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (!full) {
    for (int64_t jj = 0; jj < kBN; ++jj) {
      if (jj >= nj || !swa_allowed(i, j0 + jj, sh.window, sh.sink)) s[jj] = kNegInf;
    }
  }
  for (int64_t jj = 0; jj < kBN; jj += kW) {
    const V x = vload(s + jj) * scale;
    vstore(s + jj, x == splat(kNegInf) ? V{} : exp_nonpos(x - lse_i));
  }
}

template <typename T>
struct FwdState {
  T* kpad;  // (kBN, headdim) key rows of a partial tile, zero-padded
  T* qt;    // (headdim, kBM) scale * q rows, transposed
  T* o;     // (kBM, headdim) unnormalized output
  T* st;    // (kBN, kBM) transposed scores S^T, then P^T
  alignas(64) T m[kBM];  // running max of each query (column)
  alignas(64) T l[kBM];  // running sum of each query
};

// Online-softmax update with the transposed scores st.st of key tile rows [0, kBN) (masked entries -inf):
// P^T into st.st, o rows rescaled, m and l updated, all vectorized over the queries.
template <typename T>
void softmax_columns_update(FwdState<T>& st, int64_t D) {
  using V = VecT<T>;
  constexpr int kW = Vec<T>::kLanes;
  const V neg_inf = splat(-std::numeric_limits<T>::infinity());
  alignas(64) T alpha[kBM];
  for (int64_t r = 0; r < kBM; r += kW) {
    V mx = vload(st.m + r);
    for (int64_t jj = 0; jj < kBN; ++jj) {
      const V x = vload(st.st + jj * kBM + r);
      mx = x > mx ? x : mx;
    }
    const V m_old = vload(st.m + r);
    vstore(alpha + r, m_old == neg_inf ? V{} : exp_nonpos(m_old - mx));
    vstore(st.m + r, mx);
    V sum{};
    for (int64_t jj = 0; jj < kBN; ++jj) {
      T* row = st.st + jj * kBM + r;
      const V x = vload(row);
      const V e = x == neg_inf ? V{} : exp_nonpos(x - mx);
      vstore(row, e);
      sum += e;
    }
    vstore(st.l + r, vload(alpha + r) * vload(st.l + r) + sum);
  }
  for (int64_t r = 0; r < kBM; ++r) {
    if (alpha[r] == T(1)) continue;
    T* orow = st.o + r * D;
    for (int64_t d = 0; d < D; ++d) orow[d] *= alpha[r];
  }
}

// One key tile [j0, j0 + nj) against query rows [i0, i0 + ni): S^T = K Q^T, online softmax over each
// query's column, O += P V (rows beyond ni compute values that are never stored).
template <typename T>
void fwd_key_tile(const SwaShape& sh, const Rows<T>& k, const Rows<T>& v, int64_t b, int64_t hk, int64_t i0,
                  int64_t ni, int64_t j0, int64_t nj, FwdState<T>& st) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t D = sh.headdim;
  const bool full = nj == kBN && swa_tile_full(i0, i0 + ni, j0, j0 + nj, sh.window, sh.sink);
  const T* kr = k.at(b, j0, hk);
  int64_t ld = k.stride();
  if (nj < kBN) {
    copy_rows(k, b, hk, j0, nj, T(1), st.kpad);
    kr = st.kpad;
    ld = D;
  }
  fill_zero(st.st, kBN * kBM);
  gemm_acc<T>(kBN, kr, ld, 1, st.qt, kBM, st.st, kBM, key_rows(sh, i0, ni, j0, nj, false, D));  // S^T
  if (!full) {
    for (int64_t jj = 0; jj < kBN; ++jj) {
      T* row = st.st + jj * kBM;
      for (int64_t r = 0; r < kBM; ++r) {
        if (jj >= nj || !swa_allowed(i0 + r, j0 + jj, sh.window, sh.sink)) row[r] = kNegInf;
      }
    }
  }
  softmax_columns_update(st, D);
  gemm_acc<T>(kBM, st.st, 1, kBM, v.at(b, j0, hk), v.stride(), st.o, D,
              query_rows(sh, i0, ni, j0, nj, true, D));  // O += P V
}

// Keys [begin, end) in tiles of kBN.
template <typename T>
void fwd_key_range(const SwaShape& sh, const Rows<T>& k, const Rows<T>& v, int64_t b, int64_t hk, int64_t i0,
                   int64_t ni, int64_t begin, int64_t end, FwdState<T>& st) {
  for (int64_t j0 = begin; j0 < end; j0 += kBN) fwd_key_tile(sh, k, v, b, hk, i0, ni, j0, min64(kBN, end - j0), st);
}

// Query tile `tile` of flattened index (b * heads + h) * n_tiles + qt.
// work: (headdim * kBN + 2 * kBM * headdim + kBM * kBN).
template <typename T>
void fwd_query_tile(const SwaFwdParams& p, int64_t tile, T* work) {
  const SwaShape& sh = p.s;
  const int64_t L = sh.seqlen, D = sh.headdim;
  const int64_t n_tiles = (L + kBM - 1) / kBM;
  const int64_t qt = tile % n_tiles, bh = tile / n_tiles;
  const int64_t b = bh / sh.heads, h = bh % sh.heads, hk = h / (sh.heads / sh.kv_heads);
  const Rows<T> q{static_cast<const T*>(p.q), L, sh.heads, D};
  const Rows<T> k{static_cast<const T*>(p.k), L, sh.kv_heads, D};
  const Rows<T> v{static_cast<const T*>(p.v), L, sh.kv_heads, D};
  const int64_t i0 = qt * kBM, ni = min64(kBM, L - i0);

  FwdState<T> st;
  st.kpad = work;
  st.qt = st.kpad + kBN * D;
  st.o = st.qt + D * kBM;
  st.st = st.o + kBM * D;
  for (int64_t r = 0; r < kBM; ++r) {
    st.m[r] = -std::numeric_limits<T>::infinity();
    st.l[r] = 0;
  }
  transpose_tile(q, b, h, i0, ni, st.qt);
  const T scale = static_cast<T>(sh.scale);
  for (int64_t x = 0; x < D * kBM; ++x) st.qt[x] *= scale;
  fill_zero(st.o, kBM * D);
  fwd_key_range(sh, k, v, b, hk, i0, ni, 0, swa_sink_end(i0, sh.window, sh.sink), st);
  fwd_key_range(sh, k, v, b, hk, i0, ni, swa_window_begin(i0, sh.window), i0 + ni, st);

  T* out = static_cast<T*>(p.out);
  T* lse = static_cast<T*>(p.lse) + bh * L;
  for (int64_t r = 0; r < ni; ++r) {
    const T inv = T(1) / st.l[r];
    T* orow = out + (((b * L) + i0 + r) * sh.heads + h) * D;
    for (int64_t d = 0; d < D; ++d) orow[d] = st.o[r * D + d] * inv;
    lse[i0 + r] = st.m[r] + std::log(st.l[r]);
  }
}

template <typename T>
struct BwdState {
  T* kt;   // (headdim, kBN) key tile transposed
  T* vt;   // (headdim, kBN) value tile transposed
  T* qs;   // (kBM, headdim) q rows
  T* dos;  // (kBM, headdim) dout rows
  T* p;    // (kBM, kBN) scores, then P
  T* ds;   // (kBM, kBN) dP, then scale * dS
  T* acc;  // (kBM or kBN, headdim) x 2: dq of the query tile, or dk then dv of the key tile
};

// Splits work: swa_bwd_work_size(headdim) = 4 headdim kBN + 2 kBM headdim + 2 kBM kBN elements.
template <typename T>
BwdState<T> bwd_state(T* work, int64_t D) {
  static_assert(kBM == kBN, "the accumulators are sized for square tiles");
  BwdState<T> st;
  st.kt = work;
  st.vt = st.kt + D * kBN;
  st.qs = st.vt + D * kBN;
  st.dos = st.qs + kBM * D;
  st.p = st.dos + kBM * D;
  st.ds = st.p + kBM * kBN;
  st.acc = st.ds + kBM * kBN;
  return st;
}

// P = exp(S - lse) and scale * dS = scale * P (dP - delta) of query rows [i0, i0 + ni) of head h against
// key tile [j0, j0 + nj), from st.qs, st.dos (the rows) and st.kt, st.vt (the keys, transposed); rows
// beyond ni and keys beyond nj get P = dS = 0.
template <typename T>
void bwd_p_ds(const SwaBwdParams& pr, int64_t b, int64_t h, int64_t i0, int64_t ni, int64_t j0, int64_t nj,
              BwdState<T>& st) {
  const SwaShape& sh = pr.s;
  const int64_t L = sh.seqlen, D = sh.headdim;
  const T scale = static_cast<T>(sh.scale);
  const T* lse = static_cast<const T*>(pr.lse) + (b * sh.heads + h) * L;
  const T* delta = static_cast<const T*>(pr.delta) + (b * sh.heads + h) * L;
  const bool full = nj == kBN && swa_tile_full(i0, i0 + ni, j0, j0 + nj, sh.window, sh.sink);
  fill_zero(st.p, 2 * kBM * kBN);  // p and ds
  const auto span = query_rows(sh, i0, ni, j0, nj, false, D);
  gemm_acc<T>(kBM, st.qs, D, 1, st.kt, kBN, st.p, kBN, span);    // S = Q K^T
  gemm_acc<T>(kBM, st.dos, D, 1, st.vt, kBN, st.ds, kBN, span);  // dP = dO V^T
  for (int64_t r = 0; r < kBM; ++r) {
    T* p = st.p + r * kBN;
    T* ds = st.ds + r * kBN;
    if (r >= ni) {
      fill_zero(p, kBN);
      fill_zero(ds, kBN);
      continue;
    }
    p_row(p, scale, lse[i0 + r], i0 + r, j0, nj, full, sh);
    const VecT<T> delta_i = splat(delta[i0 + r]);
    for (int64_t jj = 0; jj < kBN; jj += Vec<T>::kLanes) {
      vstore(ds + jj, vload(p + jj) * (vload(ds + jj) - delta_i) * scale);
    }
  }
}

// dK, dV pass: key tile `kt_index` of (batch b, kv head hk), over the query tiles of every head of the
// group that see it. work: swa_bwd_work_size(headdim) elements.
template <typename T>
void bwd_dkdv_tile(const SwaBwdParams& p, int64_t b, int64_t hk, int64_t kt_index, T* work) {
  const SwaShape& sh = p.s;
  const int64_t L = sh.seqlen, D = sh.headdim, group = sh.heads / sh.kv_heads;
  const Rows<T> q{static_cast<const T*>(p.q), L, sh.heads, D};
  const Rows<T> k{static_cast<const T*>(p.k), L, sh.kv_heads, D};
  const Rows<T> v{static_cast<const T*>(p.v), L, sh.kv_heads, D};
  const Rows<T> dout{static_cast<const T*>(p.dout), L, sh.heads, D};
  BwdState<T> st = bwd_state(work, D);
  T* dk = st.acc;           // (kBN, headdim)
  T* dv = st.acc + kBN * D;  // (kBN, headdim)

  const int64_t j0 = kt_index * kBN, nj = min64(kBN, L - j0);
  const int64_t q_end = swa_query_end(j0 + nj, L, sh.window, sh.sink, j0);
  transpose_tile(k, b, hk, j0, nj, st.kt);
  transpose_tile(v, b, hk, j0, nj, st.vt);
  fill_zero(st.acc, 2 * kBN * D);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = j0; i0 < q_end; i0 += kBM) {
      const int64_t ni = min64(kBM, q_end - i0);
      copy_rows(q, b, h, i0, ni, T(1), st.qs);
      copy_rows(dout, b, h, i0, ni, T(1), st.dos);
      bwd_p_ds(p, b, h, i0, ni, j0, nj, st);
      const auto span = key_rows(sh, i0, ni, j0, nj, true, D);
      gemm_acc<T>(kBN, st.p, 1, kBN, st.dos, D, dv, D, span);  // dV += P^T dO
      gemm_acc<T>(kBN, st.ds, 1, kBN, st.qs, D, dk, D, span);  // dK += scale dS^T Q
    }
  }
  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
  for (int64_t jj = 0; jj < nj; ++jj) {
    const int64_t off = ((b * L + j0 + jj) * sh.kv_heads + hk) * D;
    for (int64_t d = 0; d < D; ++d) {
      dk_out[off + d] = dk[jj * D + d];
      dv_out[off + d] = dv[jj * D + d];
    }
  }
}

// P^T = exp(S^T - lse) and scale * dS^T = scale * P^T (dP^T - delta) in place of the transposed scores
// st (keys j0 + [0, kBN) as rows, queries i0 + [0, kBM) as columns) and dpt; lse, delta: (kBM) of the
// queries; rows beyond nj, columns beyond ni and masked pairs get 0.
template <typename T>
void bwd_pt_dst(const SwaShape& sh, int64_t i0, int64_t ni, int64_t j0, int64_t nj, const T* lse, const T* delta,
                T* st, T* dpt) {
  using V = VecT<T>;
  constexpr int kW = Vec<T>::kLanes;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const T scale = static_cast<T>(sh.scale);
  const bool full = nj == kBN && ni == kBM && swa_tile_full(i0, i0 + ni, j0, j0 + nj, sh.window, sh.sink);
  for (int64_t jj = 0; jj < kBN; ++jj) {
    T* p = st + jj * kBM;
    T* ds = dpt + jj * kBM;
    if (jj >= nj) {
      fill_zero(p, kBM);
      fill_zero(ds, kBM);
      continue;
    }
    if (!full) {
      for (int64_t r = 0; r < kBM; ++r) {
        if (r >= ni || !swa_allowed(i0 + r, j0 + jj, sh.window, sh.sink)) p[r] = kNegInf;
      }
    }
    for (int64_t r = 0; r < kBM; r += kW) {
      const V x = vload(p + r) * scale;
      const V e = x == splat(kNegInf) ? V{} : exp_nonpos(x - vload(lse + r));
      vstore(p + r, e);
      vstore(ds + r, e * (vload(ds + r) - vload(delta + r)) * scale);
    }
  }
}

// dQ pass: query tile `qt` of (batch b, head h), over the key tiles it sees (as in the forward). Scores
// are computed transposed (S^T = K Q^T, dP^T = V dO^T) so that only the query tile is transposed, once.
// work: swa_bwd_work_size(headdim) elements.
template <typename T>
void bwd_dq_tile(const SwaBwdParams& p, int64_t b, int64_t h, int64_t qt, T* work) {
  static_assert(kBM == kBN, "the query tile is transposed into key-tile-sized buffers");
  const SwaShape& sh = p.s;
  const int64_t L = sh.seqlen, D = sh.headdim, hk = h / (sh.heads / sh.kv_heads);
  const Rows<T> q{static_cast<const T*>(p.q), L, sh.heads, D};
  const Rows<T> k{static_cast<const T*>(p.k), L, sh.kv_heads, D};
  const Rows<T> v{static_cast<const T*>(p.v), L, sh.kv_heads, D};
  const Rows<T> dout{static_cast<const T*>(p.dout), L, sh.heads, D};
  BwdState<T> st = bwd_state(work, D);
  T* qt_tile = st.qs;     // (headdim, kBM) query rows transposed
  T* dot_tile = st.dos;   // (headdim, kBM) dout rows transposed
  T* k_pad = st.kt;       // (kBN, headdim) key rows of a partial tile, zero-padded
  T* v_pad = st.vt;       // (kBN, headdim) value rows of a partial tile, zero-padded
  T* dq = st.acc;         // (kBM, headdim)

  const int64_t i0 = qt * kBM, ni = min64(kBM, L - i0);
  const T* lse_in = static_cast<const T*>(p.lse) + (b * sh.heads + h) * L;
  const T* delta_in = static_cast<const T*>(p.delta) + (b * sh.heads + h) * L;
  T lse[kBM], delta[kBM];
  for (int64_t r = 0; r < kBM; ++r) {
    lse[r] = r < ni ? lse_in[i0 + r] : T(0);
    delta[r] = r < ni ? delta_in[i0 + r] : T(0);
  }
  transpose_tile(q, b, h, i0, ni, qt_tile);
  transpose_tile(dout, b, h, i0, ni, dot_tile);
  fill_zero(dq, kBM * D);
  const int64_t ranges[2][2] = {{0, swa_sink_end(i0, sh.window, sh.sink)}, {swa_window_begin(i0, sh.window), i0 + ni}};
  for (const auto& range : ranges) {
    for (int64_t j0 = range[0]; j0 < range[1]; j0 += kBN) {
      const int64_t nj = min64(kBN, range[1] - j0);
      // key and value rows (kBN, headdim) with row stride ld
      const T* kr = k.at(b, j0, hk);
      const T* vr = v.at(b, j0, hk);
      int64_t ld = k.stride();
      if (nj < kBN) {
        copy_rows(k, b, hk, j0, nj, T(1), k_pad);
        copy_rows(v, b, hk, j0, nj, T(1), v_pad);
        kr = k_pad;
        vr = v_pad;
        ld = D;
      }
      fill_zero(st.p, 2 * kBM * kBN);  // p and ds
      const auto span = key_rows(sh, i0, ni, j0, nj, false, D);
      gemm_acc<T>(kBN, kr, ld, 1, qt_tile, kBM, st.p, kBM, span);    // S^T = K Q^T
      gemm_acc<T>(kBN, vr, ld, 1, dot_tile, kBM, st.ds, kBM, span);  // dP^T = V dO^T
      bwd_pt_dst(sh, i0, ni, j0, nj, lse, delta, st.p, st.ds);
      gemm_acc<T>(kBM, st.ds, 1, kBM, k.at(b, j0, hk), k.stride(), dq, D,
                  query_rows(sh, i0, ni, j0, nj, true, D));  // dQ += scale dS K
    }
  }
  T* dq_out = static_cast<T*>(p.dq);
  for (int64_t r = 0; r < ni; ++r) {
    T* row = dq_out + ((b * L + i0 + r) * sh.heads + h) * D;
    for (int64_t d = 0; d < D; ++d) row[d] = dq[r * D + d];
  }
}

}  // namespace SWA_CPU_ISA
}  // namespace markovkit
